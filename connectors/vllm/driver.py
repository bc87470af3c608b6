"""Run prompts through one real vLLM engine and report outputs and timings (tests and ``kdn bench connectors``).

Usage (in the environment that has vLLM, e.g. ``.venv-engines``)::

    python -m connectors.vllm.driver SPEC.json OUT.json

``SPEC.json``::

    {"model": "/path/to/hf-folder", "kv_transfer_config": {...} | null, "max_model_len": 2048,
     "enable_prefix_caching": false,
     "requests": [{"prompt_token_ids": [...], "max_tokens": 16, "kv_transfer_params": {...},
                   "wait_events": {"path": "stats.jsonl", "event": "store", "count": 1}}]}

Requests run one at a time (greedy); ``wait_events`` makes the driver wait, after that request, until the
connector's stats file holds ``count`` events of that kind (stores are asynchronous). ``OUT.json`` gets the engine
start time and, per request, the generated token ids and text, ``num_cached_tokens`` and wall seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["run"]


def _count_events(path: str, event: str) -> int:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.strip() and json.loads(line).get("event") == event)


def _wait_events(spec: dict, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + spec.get("timeout", timeout)
    while time.monotonic() < deadline:
        if _count_events(spec["path"], spec["event"]) >= spec["count"]:
            return True
        time.sleep(0.05)
    return False


def run(spec: dict) -> dict:
    """Start the engine described by ``spec``, run its requests in order, return the report."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = spec.get("kv_transfer_config")
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "bfloat16"), max_model_len=spec.get("max_model_len", 2048),
              enforce_eager=True, enable_prefix_caching=spec.get("enable_prefix_caching", False), seed=0,
              kv_transfer_config=KVTransferConfig(**kv) if kv else None, max_num_seqs=spec.get("max_num_seqs", 4))
    report: dict = {"engine_start_s": time.perf_counter() - t0, "results": []}
    for req in spec["requests"]:
        extra = {"kv_transfer_params": req["kv_transfer_params"]} if req.get("kv_transfer_params") else None
        params = SamplingParams(temperature=0.0, max_tokens=req.get("max_tokens", 16), extra_args=extra,
                                ignore_eos=req.get("ignore_eos", False))
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=req["prompt_token_ids"])], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - start
        waited = _wait_events(req["wait_events"]) if req.get("wait_events") else None
        report["results"].append({"name": req.get("name", ""), "seconds": seconds,
                                  "prompt_tokens": len(out.prompt_token_ids or []),
                                  "num_cached_tokens": out.num_cached_tokens or 0,
                                  "token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text,
                                  "events_arrived": waited})
    return report


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1], sys.argv[2]
    result = run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
    # vLLM's engine-core process can outlive a plain exit; leave at once, the report is on disk.
    sys.stdout.flush()
    os._exit(0)
