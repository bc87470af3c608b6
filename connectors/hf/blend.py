"""CacheBlend for Hugging Face transformers: chunk texts + a query -> blended cache -> greedy answer.

``blend_generate(model, tokenizer, chunks, query, client)`` looks each chunk up in KDN under its content key (KV
computed alone at position 0), computes and stores the misses, blends the chunks with selective recompute
(:func:`kdn.blend.blend`) and continues greedily from the blended cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from connectors.hf.cache import cache_from_kv, kv_from_cache
from connectors.hf.generate import run_forward
from kdn import ChunkKey, content_key
from kdn.blend.blend import BlendResult, blend, concat_chunks
from kdn.blend.ratio import choose_ratio, prefill_seconds
from kdn.blend.rope import layer_inv_freqs
from kdn.errors import InvalidRequest

__all__ = ["BlendStats", "BlendGenerateResult", "chunk_kv", "fetch_chunk_kvs", "blend_generate", "greedy",
           "tokenize_chunks"]

#: ``method`` values of :func:`blend_generate`: the selection rules, plus the two baselines.
GENERATE_METHODS = ("kdn", "gradual", "single", "lookahead", "naive", "full")


@dataclass
class BlendStats:
    chunks: int = 0
    hits: int = 0
    """Chunks whose KV came from KDN."""
    stored: int = 0
    """Missed chunks computed and stored now."""
    context_tokens: int = 0
    query_tokens: int = 0
    recomputed_tokens: int = 0
    """Context tokens recomputed through the last layer."""
    ratio: float = 0.0
    """The recompute ratio used (chosen by :func:`kdn.blend.ratio.choose_ratio` when none was given)."""
    compute_fraction: float = 1.0
    """Q/K/V rows computed over all layers, relative to a full prefill."""
    fetch_s: float = 0.0
    """Fetching and computing the chunks' KV (misses included)."""
    load_s: float = 0.0
    """Fetching the chunks' KV from KDN (lookup, transfer, decode)."""
    blend_s: float = 0.0


@dataclass
class BlendGenerateResult:
    text: str
    tokens: list[int]
    logits: torch.Tensor
    """First answer token's logits ``[1, vocab]`` (float32)."""
    stats: BlendStats = field(default_factory=BlendStats)
    ttft_s: float = 0.0


def tokenize_chunks(tokenizer, chunks: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of each chunk, tokenized alone and without special tokens (ids pass through)."""
    out = []
    for c in chunks:
        ids = tokenizer(c, add_special_tokens=False).input_ids if isinstance(c, str) else list(c)
        if not ids:
            raise InvalidRequest("empty chunk")
        out.append(ids)
    return out


@torch.no_grad()
def chunk_kv(model, ids: Sequence[int]) -> torch.Tensor:
    """The KV of ``ids`` computed alone from position 0 (``[layers, 2, tokens, heads, dim]``)."""
    cache = DynamicCache()
    run_forward(model, torch.tensor([list(ids)], device=model.device), cache, want_logits=False)
    return kv_from_cache(cache)


def _content_keys(client, chunk_ids: list[list[int]]) -> list[ChunkKey]:
    return [content_key(ids, client.config.tenant, client.fingerprint, client.config.codec) for ids in chunk_ids]


def fetch_chunk_kvs(model, chunk_ids: list[list[int]], client=None, *, store: bool = True,
                    stats: BlendStats | None = None) -> list[torch.Tensor]:
    """Each chunk's position-0 KV: from ``client`` (a :class:`kdn.client.KDNClient`) where stored, else computed
    (and stored with ``put_chunks`` when ``store``). Remote failures only cost recomputation."""
    stats = stats or BlendStats()
    found: list = [None] * len(chunk_ids)
    keys: list[ChunkKey] = []
    if client is not None:
        keys = _content_keys(client, chunk_ids)
        t0 = time.perf_counter()
        # raw chunks on a same-host node: views of its shared memory, copied to the GPU inside blend (pipelined)
        found = client.get_chunks(keys, device=model.device, zero_copy=True)
        stats.load_s = time.perf_counter() - t0
    out, puts = [], []
    for i, ids in enumerate(chunk_ids):
        kv = found[i]
        if kv is not None and tuple(kv.shape[2:3]) != (len(ids),):
            kv = None  # a foreign object under a colliding key: recompute
        if kv is None:
            kv = chunk_kv(model, ids)
            if client is not None and store:
                puts.append((keys[i], kv, 0))
        else:
            stats.hits += 1
            if kv.dtype != model.dtype or (kv.device != model.device and kv.device.type != "cpu"):
                kv = kv.to(device=model.device, dtype=model.dtype)  # host chunks stay: blend pipelines them
        out.append(kv)
    if puts:
        stats.stored = sum(client.put_chunks(puts))
    return out


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy tokens continuing from ``cache`` (filled in place) whose last logits are ``logits``."""
    tokens: list[int] = []
    for step in range(max_new_tokens):
        tok = int(logits.argmax(-1).item())
        tokens.append(tok)
        if tok == eos or step == max_new_tokens - 1:
            break
        logits = run_forward(model, torch.tensor([[tok]], device=model.device), cache)
    return tokens


@torch.no_grad()
def blend_generate(model, tokenizer, chunks: Sequence[str | Sequence[int]], query: str | Sequence[int],
                   client=None, *, ratio: float | None = None, method: str = "kdn", max_new_tokens: int = 32,
                   store: bool = True, stop_at_eos: bool = True, chunk_kvs: Sequence[torch.Tensor] | None = None,
                   **blend_kwargs) -> BlendGenerateResult:
    """Answer ``query`` after ``chunks`` (texts or token-id lists), reusing their KV from KDN at any position.

    ``method``: ``kdn`` (default) / ``gradual`` / ``single`` / ``lookahead`` (selective recompute of ``ratio`` of
    the context tokens; see :mod:`kdn.blend.select`), ``naive``
    (reuse every chunk's KV as is, compute only the query) or ``full`` (plain prefill, no reuse; the reference).
    ``chunk_kvs`` (position-0 KV per chunk) skips the KDN lookup (for evaluations that reuse them). ``blend_kwargs``
    go to :func:`kdn.blend.blend` (``score``, ``start_ratio``, ``steps``, ``first_layer``).
    ``ratio=None`` picks it with :func:`kdn.blend.ratio.choose_ratio`: the measured fetch time of the chunks that
    hit against the model's profiled prefill time, never below 15 %.
    """
    if method not in GENERATE_METHODS:
        raise InvalidRequest(f"unknown method {method!r}; use one of {', '.join(GENERATE_METHODS)}")
    t0 = time.perf_counter()
    chunk_ids = tokenize_chunks(tokenizer, chunks)
    q_ids = tokenizer(query, add_special_tokens=False).input_ids if isinstance(query, str) else list(query)
    if not q_ids:
        raise InvalidRequest("empty query")
    all_ids = [t for ids in chunk_ids for t in ids] + q_ids
    stats = BlendStats(chunks=len(chunk_ids), context_tokens=len(all_ids) - len(q_ids), query_tokens=len(q_ids))
    device = model.device
    if method == "full":
        cache = DynamicCache()
        t1 = time.perf_counter()
        logits = run_forward(model, torch.tensor([all_ids], device=device), cache)
        stats.blend_s, stats.recomputed_tokens = time.perf_counter() - t1, stats.context_tokens
    else:
        if chunk_kvs is not None:
            kvs = [kv.to(device=device, dtype=model.dtype) for kv in chunk_kvs]
        else:
            kvs = fetch_chunk_kvs(model, chunk_ids, client, store=store, stats=stats)
        stats.fetch_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if method == "naive":
            kvs = [kv.to(device) for kv in kvs]  # zero-copy host chunks included
            cache = cache_from_kv(concat_chunks(kvs, layer_inv_freqs(model, device=device)), model.config)
            logits = run_forward(model, torch.tensor([q_ids], device=device), cache)
            stats.recomputed_tokens, stats.compute_fraction = 0, len(q_ids) / len(all_ids)
        else:
            if ratio is None:
                ratio = choose_ratio(prefill_seconds(model, len(all_ids)), stats.load_s if stats.hits else 0.0)
            stats.ratio = ratio
            res: BlendResult = blend(model, kvs, all_ids, ratio=ratio, method=method, **blend_kwargs)
            cache = cache_from_kv(res.kv, model.config)
            logits = res.logits
            stats.recomputed_tokens, stats.compute_fraction = len(res.selected), res.compute_fraction
        stats.blend_s = time.perf_counter() - t1
    logits = logits.float()
    ttft = time.perf_counter() - t0
    eos = tokenizer.eos_token_id if (stop_at_eos and tokenizer is not None) else None
    tokens = greedy(model, cache, logits, max_new_tokens, eos)
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
    return BlendGenerateResult(text=text, tokens=tokens, logits=logits, stats=stats, ttft_s=ttft)
