"""Probe: why does path (a) of ``kdn bench ttft`` (in-process CPU tier) vary from run to run at 8K?

Per timed call it records the host-side time and, with CUDA events, when the GPU finished the prefix copies and the
forward pass; it also measures pinned host-to-device bandwidth from each source buffer and prints the machine's
NUMA/PCIe topology. Usage (on a CUDA machine): ``python scripts/probe_ttft_host.py [--context 8K] [--rounds 12]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch

from connectors.hf import HostKVCache, cache_from_kv, kv_from_cache, layout_for, prefill
from connectors.hf import loader as loader_mod
from connectors.hf.generate import run_forward
from kdn.bench.ttft import _build_model, _canary_ms, _contexts


def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"({exc})"


def _bandwidth(src: torch.Tensor, dst: torch.Tensor, n: int = 8) -> list[float]:
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        out.append(src.numel() * src.element_size() / (a.elapsed_time(b) * 1e-3) / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="8K")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--trace", help="write a torch.profiler chrome trace of 3 host calls here")
    args = ap.parse_args()
    print("numa:", _sh("numactl -H 2>/dev/null | head -3 || ls /sys/devices/system/node"))
    print("nodes:", _sh("ls /sys/devices/system/node | grep node"))
    print("topo:", _sh("nvidia-smi topo -m | head -4"))
    print("affinity:", sorted(os.sched_getaffinity(0)))
    print("clocks:", _sh("nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks_throttle_reasons.active,power.draw "
                         "--format=csv,noheader"))
    ctx = _contexts(args.context)[0]
    notes: list[str] = []
    model, model_id = _build_model("llama3-8b", "cuda", "bfloat16", ctx, notes)
    layout = layout_for(model, model_id=model_id)
    prefix = ctx - 32
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx)).cuda()
    kv_dev = kv_from_cache(prefill(model, ids[:, :prefix], logits=False).cache)
    kv_host = torch.empty(kv_dev.shape, dtype=kv_dev.dtype, pin_memory=True)
    kv_host.copy_(kv_dev)
    host = HostKVCache(layout, chunk_size=256, capacity_bytes=2 * layout.bytes_per_token * ctx)
    host.store(ids[0, :prefix].tolist(), kv_host).result()
    segment = next(iter(host._chunks.values())).segment
    print(f"kv {kv_host.numel() * 2 / 2**30:.2f} GiB; kv_host pinned={kv_host.is_pinned()} "
          f"segment pinned={segment.is_pinned()}")
    for name, src in (("kv_host", kv_host), ("segment", segment)):
        bw = _bandwidth(src, kv_dev)
        print(f"H2D {name}: " + " ".join(f"{x:.1f}" for x in bw) + " GB/s")
    del kv_dev

    # CUDA events around the loader's enqueue and the forward pass
    marks: dict = {}
    orig = loader_mod.LayerLoader._enqueue_all

    def enqueue_all(self):
        orig(self)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self._copy_stream)
        marks["copies"] = ev

    loader_mod.LayerLoader._enqueue_all = enqueue_all

    def timed(fn):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        info = fn()
        end.record()
        end.synchronize()
        wall = time.perf_counter() - t0
        copies = marks.pop("copies", None)
        return {"wall_ms": 1e3 * wall, "gpu_ms": start.elapsed_time(end),
                "copies_done_ms": start.elapsed_time(copies) if copies is not None else None, **info}

    def full():
        return {"token": prefill(model, ids).logits.argmax(-1).item()}

    def ideal():
        kv = kv_host.to("cuda", non_blocking=True)
        with torch.no_grad():
            logits = run_forward(model, ids[:, prefix:], cache_from_kv(kv))
        return {"token": logits.argmax(-1).item()}

    def reuse():
        res = prefill(model, ids, host, lookup_len=prefix)
        s = res.stats
        return {"token": res.logits.argmax(-1).item(), "prefill_ms": 1e3 * s.prefill_s,
                "retrieve_ms": 1e3 * s.retrieve_s, "wait_ms": 1e3 * s.load_wait_s, "hit": s.hit_tokens}

    rows = {"full": [], "ideal": [], "host": []}
    for r in range(args.rounds + 1):
        for name, fn in (("full", full), ("ideal", ideal), ("host", reuse)):
            cpu = _canary_ms()
            rec = timed(fn)
            rec["canary_ms"] = cpu
            if r:
                rows[name].append(rec)
            print(f"round {r} {name}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                       for k, v in rec.items()}), flush=True)
    for name, recs in rows.items():
        walls = [x["wall_ms"] for x in recs]
        print(f"{name}: median {statistics.median(walls):.1f} ms, min {min(walls):.1f}, max {max(walls):.1f}")
    print("of_ideal per round:", " ".join(f"{i['wall_ms'] / h['wall_ms']:.2f}"
                                          for i, h in zip(rows["ideal"], rows["host"])))
    print("clocks:", _sh("nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks_throttle_reasons.active,power.draw "
                         "--format=csv,noheader"))
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                timed(ideal)
                timed(reuse)
        prof.export_chrome_trace(args.trace)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
