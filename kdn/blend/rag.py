"""Cache-aware RAG planning (after RAGServe, arXiv 2412.10543): per query, how many retrieved chunks, in which
order, and how to combine them (full prefill, naive reuse, or a blend rule and ratio), with which stored encoding
of each chunk, so that the time to first token meets a budget and the expected answer quality is highest.

Engine-independent: the caller says, per retrieved chunk, its length, its retriever score, whether KDN holds it and
where (tier) and in how many bytes per stored encoding; and the engine's measured prefill rate. The planner
estimates each configuration's TTFT with a cost model and its answer quality with a quality model:

* **TTFT** = prefill of the chunks KDN does not hold (computed alone, then stored for later queries)
  + ``max(load of the held chunks, recompute)`` (loading is pipelined layer by layer under the recompute, see
  :mod:`kdn.blend.blend`), where recompute = measured compute fraction of the rule × prefill time of the whole
  prompt; full prefill ignores the cache; ``fixed_s`` per request.
* **Quality** = P(the answer is in the chosen chunks) × the combination's quality relative to full prefill
  (:class:`QualityModel`, fitted from ``kdn bench blend --quality`` rows) × each chunk's encoding quality factor,
  plus ``(1 - P) ×`` the quality of an answer without its evidence. P comes from the retriever scores, ``p_i``
  each chunk's probability of holding the answer: ``1 - prod(1 - p_i)`` when chunks hold it independently, or
  ``min(1, sum p_i)`` with ``exclusive=True`` (exactly one candidate holds it, e.g. the scores are the retriever's
  rank probabilities); more chunks raise P but cost time.

The planner enumerates every ``k`` (a prefix of the ranking), combination and encoding choice (best everywhere or
smallest everywhere), keeps the plans within ``budget_s × safety`` and returns the best expected quality (ties:
the faster); when none fits, the fastest plan. Chunks are ordered with the most relevant last (nearest the query).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kdn.blend.ratio import TIER_GBPS
from kdn.errors import InvalidRequest

__all__ = ["Encoding", "Candidate", "CostModel", "QualityModel", "Option", "Plan", "DEFAULT_QUALITY", "plan"]


@dataclass(frozen=True)
class Encoding:
    """One stored form of a chunk's KV: codec level, bytes to fetch, quality relative to the raw KV."""

    codec: str = "raw"
    nbytes: int = 0
    quality: float = 1.0


@dataclass(frozen=True)
class Candidate:
    """A retrieved chunk, in retrieval order."""

    tokens: int
    score: float = 1.0
    """Probability (0..1) that this chunk holds the answer (a calibrated retriever score)."""
    cached: bool = False
    """Whether KDN holds its KV (a content-key lookup)."""
    tier: str = "node"
    """Where it is held (a :data:`kdn.blend.ratio.TIER_GBPS` key): what a fetch costs."""
    encodings: tuple[Encoding, ...] = ()
    """Stored encodings (empty: raw, ``nbytes`` from :attr:`CostModel.bytes_per_token`)."""


@dataclass(frozen=True)
class Option:
    """A way to combine the chunks: ``method`` (``full``, ``naive`` or a blend rule) at ``ratio``."""

    method: str
    ratio: float
    compute: float
    """Q/K/V rows computed relative to a full prefill (measured)."""
    quality: float
    """Answer quality relative to full prefill over the same chunks (measured: F1 of the greedy answer)."""


@dataclass(frozen=True)
class CostModel:
    prefill_tok_s: float
    """The engine's measured prefill rate (tokens per second), e.g. from :func:`kdn.blend.ratio.prefill_seconds`."""
    bytes_per_token: int = 0
    """Raw KV bytes per token (all layers, K and V), for chunks without explicit encodings."""
    tier_gbps: dict[str, float] = field(default_factory=lambda: dict(TIER_GBPS))
    fixed_s: float = 0.0
    """Per-request overhead (lookup, scheduling)."""

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tok_s

    def load_s(self, nbytes: int, tier: str) -> float:
        return nbytes / (self.tier_gbps.get(tier, self.tier_gbps.get("node", 1.0)) * 1e9)


@dataclass(frozen=True)
class QualityModel:
    """Answer quality of each combination relative to full prefill, and of an answer without its evidence."""

    options: tuple[Option, ...]
    no_evidence: float = 0.0
    """Quality (relative to full prefill with the evidence) when the chosen chunks miss the answer."""

    @classmethod
    def fit(cls, rows: Iterable[dict], *, no_evidence: float = 0.0, measure: str = "f1") -> QualityModel:
        """From ``kdn bench blend --quality`` rows (``method``, ``ratio``, ``compute``, ``f1`` / ``agreement``).
        ``prefix`` rows are dropped (they need the first chunk at the front, not a reordering)."""
        opts = [Option(r["method"], float(r["ratio"]), float(r["compute"]), float(r[measure]))
                for r in rows if r["method"] != "prefix"]
        if not any(o.method == "full" for o in opts):
            opts.append(Option("full", 1.0, 1.0, 1.0))
        return cls(tuple(_pareto(opts)), no_evidence)


def _pareto(options: list[Option]) -> list[Option]:
    """Drop options another one beats (no more compute, no less quality); full and naive always stay."""
    keep = []
    for o in options:
        beaten = any((p.compute <= o.compute and p.quality > o.quality)
                     or (p.compute < o.compute and p.quality >= o.quality) for p in options)
        if not beaten or o.method in ("full", "naive"):
            keep.append(o)
    return keep


#: Measured on SmolLM2-135M, 50 wiki prompts (docs/blend.md, 2026-11-26): greedy-answer F1 against full prefill.
DEFAULT_QUALITY = QualityModel((
    Option("full", 1.0, 1.0, 1.0),
    Option("naive", 0.0, 0.03, 0.68),
    Option("lookahead", 0.15, 0.24, 0.83),
    Option("lookahead", 0.2, 0.29, 0.844),
    Option("kdn", 0.15, 0.36, 0.83),
    Option("kdn", 0.3, 0.46, 0.89),
    Option("kdn", 0.5, 0.69, 0.99),
), no_evidence=0.3)


@dataclass
class Plan:
    chunks: list[int]
    """Indices into the candidates, in prompt order (most relevant last)."""
    method: str
    ratio: float
    encodings: list[Encoding | None]
    """Per chosen chunk: the encoding to fetch (None: not held, computed and stored)."""
    ttft_s: float
    quality: float
    """Expected answer quality relative to full prefill over every candidate."""
    recall: float
    """P(the answer is in the chosen chunks)."""
    within_budget: bool


def _recall(scores: Iterable[float], exclusive: bool = False) -> float:
    """P(the answer is in chunks of these scores): independent holders, or exactly one holder (``exclusive``)."""
    clipped = [min(1.0, max(0.0, s)) for s in scores]
    if exclusive:
        return min(1.0, sum(clipped))
    miss = 1.0
    for s in clipped:
        miss *= 1.0 - s
    return 1.0 - miss


def _encodings(c: Candidate, cost: CostModel) -> tuple[Encoding, ...]:
    return c.encodings or (Encoding("raw", c.tokens * cost.bytes_per_token, 1.0),)


def _estimate(cands: Sequence[Candidate], chosen: Sequence[int], query_tokens: int, option: Option,
              pick_small: bool, cost: CostModel) -> tuple[float, float, list[Encoding | None]]:
    """``(ttft_s, quality factor of the encodings, encodings)`` of one configuration."""
    total = sum(cands[i].tokens for i in chosen) + query_tokens
    if option.method == "full":
        return cost.fixed_s + cost.prefill_s(total), 1.0, [None] * len(chosen)
    missed = sum(cands[i].tokens for i in chosen if not cands[i].cached)
    load, factor, encs = 0.0, 1.0, []
    for i in chosen:
        c = cands[i]
        if not c.cached:
            encs.append(None)
            continue
        opts = _encodings(c, cost)
        enc = min(opts, key=lambda e: e.nbytes) if pick_small else max(opts, key=lambda e: (e.quality, -e.nbytes))
        encs.append(enc)
        load += cost.load_s(enc.nbytes, c.tier)
        factor *= enc.quality
    compute = max(option.compute, query_tokens / max(1, total))
    return cost.fixed_s + cost.prefill_s(missed) + max(load, compute * cost.prefill_s(total)), factor, encs


def plan(candidates: Sequence[Candidate], query_tokens: int, budget_s: float, cost: CostModel,
         quality: QualityModel = DEFAULT_QUALITY, *, max_chunks: int | None = None, min_chunks: int = 1,
         safety: float = 0.9, exclusive: bool = False) -> Plan:
    """The plan of highest expected quality whose estimated TTFT is within ``budget_s * safety`` (the fastest plan
    when none is). ``candidates`` in retrieval order (best first); ``max_chunks`` caps ``k``; ``exclusive``: the
    scores are probabilities of exclusive events (exactly one candidate holds the answer), so recall is their sum."""
    if query_tokens <= 0:
        raise InvalidRequest("the query is empty")
    if not candidates:
        raise InvalidRequest("no candidate chunks")
    if cost.prefill_tok_s <= 0:
        raise InvalidRequest("prefill rate must be positive")
    if exclusive and sum(min(1.0, max(0.0, c.score)) for c in candidates) > 1.0 + 1e-6:
        raise InvalidRequest("exclusive scores must sum to at most 1 (exactly one candidate holds the answer)")
    top = len(candidates) if max_chunks is None else max(1, min(max_chunks, len(candidates)))
    lo = max(1, min(min_chunks, top))
    best: Plan | None = None
    fastest: Plan | None = None
    for k in range(lo, top + 1):
        chosen = sorted(range(k), key=lambda i: candidates[i].score)  # most relevant nearest the query
        recall = _recall((candidates[i].score for i in chosen), exclusive)
        for option in quality.options:
            for pick_small in (False, True):
                if option.method == "full" and pick_small:
                    continue
                ttft, factor, encs = _estimate(candidates, chosen, query_tokens, option, pick_small, cost)
                q = recall * option.quality * factor + (1.0 - recall) * quality.no_evidence
                p = Plan(list(chosen), option.method, option.ratio, encs, ttft, q, recall,
                         ttft <= budget_s * safety)
                if fastest is None or p.ttft_s < fastest.ttft_s - 1e-12:
                    fastest = p
                if p.within_budget and (best is None or p.quality > best.quality + 1e-9
                                        or (math.isclose(p.quality, best.quality, abs_tol=1e-9)
                                            and p.ttft_s < best.ttft_s)):
                    best = p
    assert fastest is not None
    return best if best is not None else fastest
