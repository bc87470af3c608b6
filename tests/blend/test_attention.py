"""Attention of kept queries over all keys, causal by position: every path against a plain softmax reference."""

from __future__ import annotations

import pytest
import torch

from kdn.blend.attention import attend, triton_available


def reference(q, k, v, pos, scale):
    """Softmax attention in float64, one query at a time: query i sees keys 0..pos[i]."""
    groups = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(groups, 1)[0]
    vv = v.double().repeat_interleave(groups, 1)[0]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, p in enumerate(pos.tolist()):
        s = torch.einsum("hd,hkd->hk", q[0, :, i].double(), kk[:, :p + 1]) * scale
        out[0, :, i] = torch.einsum("hk,hkd->hd", torch.softmax(s, -1), vv[:, :p + 1])
    return out


def case(n_keys: int, n: int, seed: int = 0, heads: int = 8, kv_heads: int = 2, d: int = 64, device="cpu",
         dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(n_keys, generator=g)[:n].sort().values
    pos[-1] = n_keys - 1 if n > 1 else pos[-1]
    # strided like blend's tensors: [1, tokens, heads, d] transposed to [1, heads, tokens, d]
    q = torch.randn(1, n, heads, d, generator=g).transpose(1, 2)
    k = torch.randn(1, n_keys, kv_heads, d, generator=g).transpose(1, 2)
    v = torch.randn(1, n_keys, kv_heads, d, generator=g).transpose(1, 2)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [pos.to(device)]


@pytest.mark.parametrize("n_keys,n", [(50, 50), (50, 7), (130, 1), (200, 150)])
def test_sdpa_paths_match_reference(n_keys, n):
    q, k, v, pos = case(n_keys, n)
    got = attend(q, k, v, pos, 0.125, use_triton=False)
    want = reference(q, k, v, pos, 0.125)
    if n == n_keys:
        want = reference(q, k, v, torch.arange(n_keys), 0.125)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("n_keys,n,d", [(8224, 1300, 128), (8224, 4934, 128), (300, 1, 64), (1000, 63, 128),
                                        (1000, 65, 128), (257, 200, 32)])
def test_triton_matches_sdpa_on_gpu(n_keys, n, d):
    q, k, v, pos = case(n_keys, n, d=d, heads=32, kv_heads=8, device="cuda", dtype=torch.bfloat16)
    got = attend(q, k, v, pos, d ** -0.5, use_triton=True)
    masked = attend(q, k, v, pos, d ** -0.5, use_triton=False)
    torch.testing.assert_close(got.float(), masked.float(), atol=2e-2, rtol=2e-2)
    if n <= 200:
        torch.testing.assert_close(got.double().cpu(), reference(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), d ** -0.5),
                                   atol=2e-2, rtol=2e-2)
