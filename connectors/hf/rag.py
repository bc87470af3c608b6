"""Cache-aware RAG for Hugging Face models: ``rag_generate(model, tokenizer, query, chunks, budget_ms=...)``.

Looks the retrieved chunks up in KDN by content key (which are held, on which node), asks the planner
(:func:`kdn.blend.rag.plan`) how many to use, in which order and how to combine them within the TTFT budget, then
answers with :func:`connectors.hf.blend.blend_generate` (misses are computed alone and stored for later queries).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from connectors.hf.blend import BlendGenerateResult, _content_keys, blend_generate, tokenize_chunks
from kdn.blend.rag import DEFAULT_QUALITY, Candidate, CostModel, Plan, QualityModel, plan
from kdn.blend.ratio import prefill_seconds
from kdn.errors import InvalidRequest, KDNError

__all__ = ["RagResult", "rag_generate", "kv_bytes_per_token", "held_chunks"]


@dataclass
class RagResult:
    answer: BlendGenerateResult
    plan: Plan
    plan_s: float
    """Lookup and planning time (inside ``answer.ttft_s``'s budget: counted in :attr:`ttft_s`)."""

    @property
    def text(self) -> str:
        return self.answer.text

    @property
    def ttft_s(self) -> float:
        return self.plan_s + self.answer.ttft_s


def kv_bytes_per_token(model) -> int:
    """Raw KV bytes per token of ``model`` (all layers, K and V)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * model.dtype.itemsize


def held_chunks(client, chunk_ids: list[list[int]]) -> list[bool]:
    """Which chunks KDN holds (a probe of the controller's index: not counted as a use). All False when the
    controller cannot be reached (the planner then assumes recomputation)."""
    if client is None:
        return [False] * len(chunk_ids)
    try:
        return [bool(locs) for locs in client.locate(_content_keys(client, chunk_ids), probe=True)]
    except KDNError:
        return [False] * len(chunk_ids)


def rag_generate(model, tokenizer, query: str | Sequence[int], chunks: Sequence[str | Sequence[int]], *,
                 budget_ms: float, client=None, scores: Sequence[float] | None = None,
                 quality: QualityModel = DEFAULT_QUALITY, prefill_tok_s: float | None = None, tier: str = "node",
                 max_chunks: int | None = None, max_new_tokens: int = 32, held: Sequence[bool] | None = None,
                 exclusive: bool = False,
                 **generate_kwargs) -> RagResult:
    """Answer ``query`` from the retrieved ``chunks`` (retrieval order, best first; ``scores``: each one's
    probability of holding the answer, default a decaying prior) within a TTFT budget of ``budget_ms``.

    ``prefill_tok_s`` is the engine's prefill rate (default: profiled once per model with
    :func:`kdn.blend.ratio.prefill_seconds`); ``tier`` where held chunks come from; ``held`` overrides the KDN
    lookup (evaluations); ``exclusive``: ``scores`` are exclusive (exactly one chunk holds the answer, e.g. rank
    probabilities), see :func:`kdn.blend.rag.plan`. Extra keyword arguments go to
    :func:`connectors.hf.blend.blend_generate`.
    """
    if budget_ms <= 0:
        raise InvalidRequest("budget_ms must be positive")
    t0 = time.perf_counter()
    chunk_ids = tokenize_chunks(tokenizer, chunks)
    q_ids = tokenizer(query, add_special_tokens=False).input_ids if isinstance(query, str) else list(query)
    if not q_ids:
        raise InvalidRequest("empty query")
    if scores is None:
        scores = [0.5 / (1 + i) for i in range(len(chunk_ids))]
    if len(scores) != len(chunk_ids):
        raise InvalidRequest(f"{len(scores)} scores for {len(chunk_ids)} chunks")
    if prefill_tok_s is None:
        prefill_tok_s = 1024 / prefill_seconds(model, 1024)
    held = list(held) if held is not None else held_chunks(client, chunk_ids)
    per_token = kv_bytes_per_token(model)
    cands = [Candidate(len(ids), float(s), bool(h), tier) for ids, s, h in zip(chunk_ids, scores, held)]
    chosen = plan(cands, len(q_ids), budget_ms / 1e3, CostModel(prefill_tok_s, per_token), quality,
                  max_chunks=max_chunks, exclusive=exclusive)
    plan_s = time.perf_counter() - t0
    picked = [chunk_ids[i] for i in chosen.chunks]
    answer = blend_generate(model, tokenizer, picked, q_ids, client, method=chosen.method,
                            ratio=chosen.ratio if chosen.method not in ("full", "naive") else None,
                            max_new_tokens=max_new_tokens, **generate_kwargs)
    return RagResult(answer, chosen, plan_s)
