"""Throughput of the GPU-backend block gather/scatter against a plain pinned copy of the same bytes (CUDA only).

Usage (on a CUDA machine; no vLLM needed)::

    python -m connectors.vllm.bench_layouts [--tokens 8192] [--block-size 16] [--json OUT]

A Llama-3-8B-shaped request (32 layers, 8 KV heads, head dim 128, bf16: 128 KiB per token, 1 GiB at 8K tokens)
lives in a paged cache of twice as many blocks, its blocks scattered at random. Per layout (``LBNHC``, ``LBHNC``,
``BLHNC``: the strides vLLM 0.32 gives FlashAttention/FlashInfer/Triton, from ``tests/connectors/data``):

- ``store``: per layer, :meth:`StridedKVLayout.gather` into a GPU staging tensor (one kernel) and an async copy
  into page-locked host memory — what the connector does before ``KDNClient.store``;
- ``load``: per layer, an async copy from page-locked memory and :meth:`StridedKVLayout.scatter` (one kernel);
- ``plain``: the same bytes as one contiguous GPU tensor <-> page-locked memory, per layer.

The issue's goal is ``store`` and ``load`` >= 0.8x ``plain``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from connectors.vllm.paged import StridedKVLayout

__all__ = ["run"]

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "connectors" / "data" / "vllm_layouts.json"
LAYERS, HEADS, DIM = 32, 8, 128


def _views(layout: str, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    """Per-layer views with vLLM's stride order for ``layout`` (scaled from the recorded allocation)."""
    order = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4), "BLHNC": (1, 0, 2, 3, 4)}[layout]
    recorded = json.loads(FIXTURE.read_text())["allocations"][f"{layout}/{block_size}/llama-like"]
    shape = (LAYERS, num_blocks, HEADS, block_size, 2 * DIM)  # logical [L, B, H, N, C]
    physical = torch.empty([shape[i] for i in order], dtype=torch.bfloat16, device="cuda")
    logical = physical.permute([order.index(i) for i in range(5)])
    views = [logical[i] for i in range(LAYERS)]
    # Same stride *order* as vLLM's own allocation of this layout (checked, not assumed).
    rec = next(iter(recorded["views"].values()))["stride"]
    ranks = sorted(range(4), key=lambda i: -rec[i])
    assert sorted(range(4), key=lambda i: -views[0].stride(i)) == ranks, (layout, rec, views[0].stride())
    return views


def _time(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run(tokens: int = 8192, block_size: int = 16, repeat: int = 5) -> dict:
    nb = tokens // block_size
    num_blocks = 2 * nb
    ids = torch.randperm(num_blocks)[:nb].tolist()
    layer_bytes = 2 * tokens * HEADS * DIM * 2
    host = torch.empty(LAYERS, 2, tokens, HEADS, DIM, dtype=torch.bfloat16).pin_memory()
    staging = torch.empty(2, tokens, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    dense = torch.randn(LAYERS, 2, tokens, HEADS, DIM, device="cuda").to(torch.bfloat16)
    gbps = lambda s: round(LAYERS * layer_bytes / s / 1e9, 2)  # noqa: E731
    plain_d2h = _time(lambda: [host[i].copy_(dense[i], non_blocking=True) for i in range(LAYERS)], repeat)
    plain_h2d = _time(lambda: [dense[i].copy_(host[i], non_blocking=True) for i in range(LAYERS)], repeat)
    out = {"device": torch.cuda.get_device_name(), "tokens": tokens, "block_size": block_size,
           "bytes": LAYERS * layer_bytes, "plain_store_GBps": gbps(plain_d2h), "plain_load_GBps": gbps(plain_h2d),
           "layouts": {}}
    paged = StridedKVLayout(block_size, HEADS, DIM)
    for layout in ("LBNHC", "LBHNC", "BLHNC"):
        caches = _views(layout, num_blocks, block_size)
        for i in range(LAYERS):
            paged.scatter(caches[i], ids, dense[i])
        assert all(torch.equal(paged.gather(caches[i], ids), dense[i]) for i in range(LAYERS))

        def store(caches=caches):
            for i in range(LAYERS):
                paged.gather(caches[i], ids, out=staging)
                host[i].copy_(staging, non_blocking=True)

        def load(caches=caches):
            for i in range(LAYERS):
                paged.scatter(caches[i], ids, host[i])

        s, ld = _time(store, repeat), _time(load, repeat)
        out["layouts"][layout] = {"store_GBps": gbps(s), "load_GBps": gbps(ld),
                                  "store_vs_plain": round(plain_d2h / s, 3), "load_vs_plain": round(plain_h2d / ld, 3)}
        caches = []
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    result = run(args.tokens, args.block_size)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
