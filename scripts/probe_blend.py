# ruff: noqa: B023 - closures are called within their loop iteration
"""Probe: where ``kdn.blend.blend`` spends its time on a GPU, and how fast each attention variant for "kept
queries at arbitrary positions over all keys, causal by position" runs at the bench's shapes.

Usage (CUDA machine): ``python scripts/probe_blend.py [--methods kdn,single] [--profile]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, n: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def attention_variants(total: int = 8224) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(1, 8, total, 128, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    for n in (total, 4934, 2500, 1300):
        pos = torch.randperm(total, device=dev, generator=g)[:n].sort().values
        q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
        mask = torch.arange(total, device=dev)[None, :] <= pos[:, None]
        res = {}

        def cur():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True,
                                                  scale=128 ** -0.5)

        def expand_bool():
            ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
            return F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask[None, None])

        def expand_add():
            ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=dev).masked_fill_(~mask, float("-inf"))
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, ke, ve, attn_mask=bias[None, None])

        def expand_bool_eff():
            ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask[None, None])

        def fold_groups():  # q heads of one KV head folded into the query axis; mask repeated per group
            qf = q.view(1, 8, 4 * n, 128)
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask.repeat(4, 1)[None, None])

        def triton_pos():
            from kdn.blend.attention import attend

            return attend(q, k, v, pos, 128 ** -0.5, use_triton=True)

        def flash_full():  # reference: a causal prefill of all tokens (flash)
            qq = torch.randn(1, 32, total, 128, device=dev, dtype=torch.bfloat16)
            return F.scaled_dot_product_attention(qq, k, v, is_causal=True, enable_gqa=True)

        ref = cur().float()
        for name, fn in (("current (gqa+bool)", cur), ("expand+bool", expand_bool),
                         ("expand+bool EFF", expand_bool_eff), ("expand+additive EFF", expand_add),
                         ("fold groups EFF", fold_groups), ("triton positional", triton_pos),
                         ("flash causal all", flash_full)):
            try:
                ms = _time(fn)
                out = fn()
                err = "" if name.startswith("flash") or name.startswith("fold") else \
                    f" maxdiff {float((out.float() - ref).abs().max()):.3g}"
                res[name] = f"{ms:.2f} ms{err}"
            except Exception as exc:  # noqa: BLE001
                res[name] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        print(f"attention n={n} of {total}: " + "; ".join(f"{k}: {v}" for k, v in res.items()), flush=True)


def blend_profile(methods: list[str], profile: bool) -> None:
    from transformers import DynamicCache

    from connectors.hf.blend import chunk_kv
    from connectors.hf.generate import run_forward
    from kdn.bench.ttft import _build_model
    from kdn.blend import blend

    model, _ = _build_model("llama3-8b", "cuda", "bfloat16", 8192 + 32, [])
    ids = torch.randint(0, model.config.vocab_size, (8192 + 32,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [ids[s:s + 512] for s in range(0, 8192, 512)]
    kvs = [torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True).copy_(kv) for kv in (chunk_kv(model, c)
                                                                                         for c in chunks)]
    dev_ids = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        print(f"full prefill: {_time(lambda: run_forward(model, dev_ids, DynamicCache()), 3):.1f} ms", flush=True)
    for method in methods:
        t = _time(lambda: blend(model, kvs, ids, ratio=0.15, method=method), 3)
        res = blend(model, kvs, ids, ratio=0.15, method=method)
        print(f"blend {method}: {t:.1f} ms, compute {res.compute_fraction:.3f}", flush=True)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof_ctx

            with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                blend(model, kvs, ids, ratio=0.15, method=method)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="kdn,single")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    args = ap.parse_args()
    if not args.skip_attention:
        attention_variants()
    blend_profile(args.methods.split(","), args.profile)


if __name__ == "__main__":
    main()
