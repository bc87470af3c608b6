# ruff: noqa: B023 - closures are called within their loop iteration
"""Probe: where the GPU CacheGen encode and decode spend their time (CUDA events around every kernel and GEMM).

Same data as ``kdn bench codec --device cuda`` (8K tokens of a Llama-3-8B-shaped cache, 32 chunks of 256 tokens,
all layers per section). Usage: ``python scripts/probe_codec_stages.py [--levels cachegen-high,cachegen-default]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from codec import _gpu, get_codec
from codec.profile import build_profile
from kdn.format.layout import KVLayout

_events: list = []


def _mark(name: str):
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    _events.append((name, ev))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="cachegen-high,cachegen-default,cachegen-compact")
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--stream-channels", type=int, default=0, help="profile stream_channels (0: default)")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    layers, heads, dim, tokens, chunk = 32, 8, 128, 8192, 256
    layout = KVLayout("llama3-8b", layers, heads, dim, "bfloat16")
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(layers, 2, 1, heads, dim, generator=gen))
    profile = build_profile([(torch.randn(layout.shape(512), generator=gen) * scale).to(torch.bfloat16)],
                            model_id="llama3-8b", max_tokens=512, stream_channels=args.stream_channels or None)
    print(f"stream_channels {profile.stream_channels}")
    kv = (torch.randn(layout.shape(tokens), generator=torch.Generator(device=dev).manual_seed(1), device=dev)
          * scale.to(dev)).to(torch.bfloat16)
    nbytes = kv.numel() * 2
    chunks = [kv[:, :, i * chunk:(i + 1) * chunk] for i in range(tokens // chunk)]

    orig_launch = _gpu.GpuCacheGen._launch
    orig_bmm = torch.bmm

    def launch(self, name, *a, **k):
        _mark(name + ">")
        orig_launch(self, name, *a, **k)
        _mark(name + "<")

    def bmm(*a, **k):
        _mark("bmm>")
        out = orig_bmm(*a, **k)
        _mark("bmm<")
        return out

    for level in args.levels.split(","):
        codec = get_codec(level, layout, profile=profile)
        g = _gpu.for_codec(codec, dev)
        cache = torch.empty_like(kv)
        outs = [cache[:, :, i * chunk:(i + 1) * chunk] for i in range(tokens // chunk)]
        enc = g.encode(chunks, 0)  # warm-up (compiles kernels)
        batch = g.prepare(enc, layers, chunk, 0, 2)
        g.run(batch, outs)
        size = sum(len(e) for e in enc)
        for what, fn in (("encode", lambda: g.encode(chunks, 0)), ("decode", lambda: g.run(batch, outs))):
            _gpu.GpuCacheGen._launch, torch.bmm = launch, bmm
            stages, walls = defaultdict(list), []
            try:
                for _ in range(args.repeat):
                    _events.clear()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    _mark("start>")
                    fn()
                    _mark("end<")
                    torch.cuda.synchronize()
                    walls.append(time.perf_counter() - t0)
                    open_: dict = {}
                    per = defaultdict(float)
                    for name, ev in _events:
                        if name.endswith(">"):
                            open_[name[:-1]] = ev
                        elif name[:-1] in open_:
                            per[name[:-1]] += open_.pop(name[:-1]).elapsed_time(ev)
                    per["total (gpu span)"] = _events[0][1].elapsed_time(_events[-1][1])
                    for k, v in per.items():
                        stages[k].append(v)
            finally:
                _gpu.GpuCacheGen._launch, torch.bmm = orig_launch, orig_bmm
            wall = statistics.median(walls)
            print(f"{level} {what}: wall {1e3 * wall:.2f} ms = {nbytes / wall / 1e9:.1f} GB/s (ratio "
                  f"{nbytes / size:.2f}x)")
            for k, v in stages.items():
                print(f"    {k:24s} {statistics.median(v):7.3f} ms")


if __name__ == "__main__":
    main()
