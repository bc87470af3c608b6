"""CacheBlend on a Gemma 3-shaped model (random weights, real transformers modules): sliding-window and full layers,
q/k norms, sandwich norms, a RoPE table per layer type. Exactness only; quality is measured on the real Gemma 3
270M by ``kdn bench blend --quality --model gemma3``."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig

from connectors.hf.blend import chunk_kv
from connectors.hf.cache import kv_from_cache
from connectors.hf.generate import run_forward
from kdn.blend import blend, concat_chunks
from kdn.blend.attention import attend
from kdn.blend.models import check_blend_supported, check_supported
from kdn.blend.rope import layer_inv_freqs
from kdn.errors import InvalidRequest


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=24,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"], max_position_embeddings=512,
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                           attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval()


def _prompt():
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randint(5, 512, (n,), generator=gen).tolist() for n in (20, 17, 23)]
    query = torch.randint(5, 512, (6,), generator=gen).tolist()
    return chunks, query


def _prefill(model, ids):
    cache = DynamicCache()
    logits = run_forward(model, torch.tensor([ids]), cache)
    return kv_from_cache(cache), logits


def test_gemma_is_blend_only(gemma):
    check_blend_supported(gemma.config)
    with pytest.raises(InvalidRequest):
        check_supported(gemma.config)  # storing its KV through the prefix connector is not supported
    inv = layer_inv_freqs(gemma)
    assert not torch.equal(inv[0], inv[2]) and torch.equal(inv[0], inv[1])  # local vs global RoPE base


@pytest.mark.parametrize("method", ["kdn", "gradual", "single", "lookahead"])
def test_gemma_full_ratio_equals_prefill(gemma, method):
    """ratio 1 recomputes everything: the same KV and logits as the model's own forward, whose sliding layers
    mask keys more than 24 positions back (the prompt has 66 tokens, so the window matters)."""
    chunks, query = _prompt()
    ids = [t for c in chunks for t in c] + query
    ref_kv, ref_logits = _prefill(gemma, ids)
    res = blend(gemma, [chunk_kv(gemma, c) for c in chunks], ids, ratio=1.0, method=method)
    assert torch.allclose(res.kv, ref_kv, atol=1e-5)
    assert torch.allclose(res.logits, ref_logits, atol=1e-4)


def test_gemma_layer0_and_partial_blend(gemma):
    chunks, query = _prompt()
    ids = [t for c in chunks for t in c] + query
    ref_kv, ref_logits = _prefill(gemma, ids)
    kvs = [chunk_kv(gemma, c) for c in chunks]
    n_ctx = sum(map(len, chunks))
    stale = concat_chunks(kvs, layer_inv_freqs(gemma))
    # layer 0 depends only on tokens and positions: re-rotated with each layer type's own table, it is exact
    assert torch.allclose(stale[0], ref_kv[0, :, :n_ctx], atol=1e-4)
    assert not torch.allclose(stale[2], ref_kv[2, :, :n_ctx], atol=1e-4)  # deeper layers deviate
    res = blend(gemma, kvs, ids, ratio=0.3, method="kdn")
    assert 0.3 < res.compute_fraction < 1.0
    assert torch.isfinite(res.logits).all()
    err_blend = (res.kv[2:, :, :n_ctx] - ref_kv[2:, :, :n_ctx]).abs().mean()
    err_naive = (stale[2:] - ref_kv[2:, :, :n_ctx]).abs().mean()
    assert err_blend < err_naive


def test_sliding_window_attention_matches_reference():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    pos = torch.tensor([3, 10, 22, 30, 39])
    out = attend(q, k, v, pos, 0.25, window=8)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for i, p in enumerate(pos.tolist()):
        lo = max(0, p - 8 + 1)
        w = torch.softmax(torch.einsum("hd,hnd->hn", q[0, :, i], kk[0, :, lo:p + 1]) * 0.25, -1)
        ref = torch.einsum("hn,hnd->hd", w, vv[0, :, lo:p + 1])
        assert torch.allclose(out[0, :, i], ref, atol=1e-5)
