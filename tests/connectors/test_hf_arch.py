"""Connector pieces on tiny random Llama-, Qwen2- and Mistral-style models (fast, no servers): exact reuse through
the in-process host tier, cache conversions, and clear errors for unsupported architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from connectors.hf import HostKVCache, cache_from_kv, kdn_generate, kv_from_cache, layout_for, prefill
from kdn.errors import InvalidRequest
from kdn.format.layout import KVLayout

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    else:  # Mistral with a sliding window shorter than the prompts
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=24))
    return model.eval()


def greedy(model, ids: list[int], n: int = 6) -> list[int]:
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_reuse_is_exact_for_each_family(kind):
    model = tiny(kind)
    host = HostKVCache(layout_for(model, model_id=f"test/tiny-{kind}"), chunk_size=16)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (90,), generator=g).tolist()
    b = a[:40] + torch.randint(0, 256, (30,), generator=g).tolist()
    for prompt, hit in ((a, 0), (a, 89), (b, 32)):
        out = kdn_generate(model, None, prompt, host, max_new_tokens=6, do_sample=False)
        assert out.tokens == greedy(model, prompt), (kind, hit)
        assert out.stats.hit_tokens == hit


def test_cache_conversions_round_trip():
    model = tiny("llama")
    ids = torch.randint(0, 256, (1, 40))
    filled = prefill(model, ids).cache
    kv = kv_from_cache(filled)
    assert kv.shape == (4, 2, 40, 2, 16) and kv.is_contiguous()
    again = cache_from_kv(kv, model.config)
    assert again.get_seq_length() == 40 and torch.equal(kv_from_cache(again), kv)
    assert torch.equal(kv_from_cache(filled, 10), kv[:, :, :10])
    with pytest.raises(InvalidRequest, match="does not match"):
        cache_from_kv(kv[:, :, :, :1], model.config)
    with pytest.raises(InvalidRequest, match="tokens"):
        kv_from_cache(filled, 41)


def test_unsupported_architectures_fail_clearly():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64))
    hybrid = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=2))
    with pytest.raises(InvalidRequest, match="'gpt2' is not supported"):
        layout_for(gpt2, model_id="x")
    with pytest.raises(InvalidRequest, match="encoder-decoder"):
        layout_for(t5, model_id="x")
    with pytest.raises(InvalidRequest, match="hybrid"):
        kdn_generate(hybrid, None, [1, 2, 3], None)
    with pytest.raises(InvalidRequest, match="model_id"):
        layout_for(tiny("llama"))  # random weights have no name: refuse to guess one


def test_layout_mismatch_is_refused():
    model = tiny("llama")
    wrong = KVLayout.from_dict({**layout_for(model, model_id="x").to_dict(), "num_kv_heads": 4})
    other = HostKVCache(wrong)
    with pytest.raises(InvalidRequest, match="does not match"):
        prefill(model, [1, 2, 3, 4], other)


def test_host_cache_is_lru_bounded_and_coalesces_segments():
    layout = layout_for(tiny("llama"), model_id="test/tiny-llama")
    per_chunk = 16 * layout.bytes_per_token
    host = HostKVCache(layout, chunk_size=16, capacity_bytes=5 * per_chunk)
    a, b = list(range(64)), list(range(100, 164))
    kv = torch.randn(layout.shape(64))
    assert host.store(a, kv).result().stored == 4
    stream = host.retrieve_layers(a)
    assert stream.num_tokens == 64 and len(stream.runs) == 1  # one segment: two copies per layer
    out = torch.empty(layout.shape(64, 1))
    assert torch.equal(stream.decode_group(2, 3, out=out), kv[2:3])
    result = host.store(b, kv).result()
    assert (result.stored, result.evicted) == (4, 3) and host.used_bytes <= 5 * per_chunk
    assert host.lookup(b) == 64 and host.lookup(a) == 0  # a's oldest chunks went first
    assert host.store(b, kv).result().skipped == 4
    with pytest.raises(InvalidRequest, match="tokens"):
        host.store(a[:10], kv)
