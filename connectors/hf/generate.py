"""Prefix reuse for Hugging Face transformers: prefill with KV from KDN, then generate.

``kdn_generate(model, tokenizer, prompt, client)`` is the one call for users; ``prefill`` is the engine-level
piece (it returns the filled cache and the last position's logits).
"""

from __future__ import annotations

import inspect
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from connectors.hf.cache import KDNPrefixCache, PrefixLoadError, cache_kwarg, check_supported, kv_from_cache
from connectors.hf.loader import LayerLoader
from kdn import KVLayout
from kdn.client.same_host import fast_source
from kdn.errors import InvalidRequest

__all__ = ["prefill", "kdn_generate", "run_forward", "PrefillResult", "PrefillStats", "GenerateResult"]

log = logging.getLogger(__name__)


@dataclass
class PrefillStats:
    prompt_tokens: int = 0
    hit_tokens: int = 0
    """Leading tokens whose KV came from KDN."""
    computed_tokens: int = 0
    """Tokens the model computed in this prefill."""
    retrieve_s: float = 0.0
    """Lookup, fetch and verification (before the first layer can be decoded)."""
    prefill_s: float = 0.0
    """The suffix forward pass, including any wait for layers still loading."""
    load_wait_s: float = 0.0
    """Part of ``prefill_s`` the model spent blocked on loading."""
    bytes: int = 0
    layer_major: bool = False
    """The hit's layers arrived over the network while the suffix was computed (see ``retrieve_layers``)."""
    fallback: str = ""
    """Why a hit was dropped and recomputed (e.g. a layer failed to decode), or empty."""
    trace: dict = field(default_factory=dict)
    """Overlap evidence from :class:`~connectors.hf.loader.LoadTrace` (empty without a hit)."""


@dataclass
class PrefillResult:
    cache: DynamicCache
    """Holds the KV of every prefilled token; pass it to ``generate``."""
    logits: torch.Tensor | None
    """Logits of the last prefilled position ``[1, vocab]`` (None when ``logits=False``)."""
    stats: PrefillStats


@dataclass
class GenerateResult:
    text: str
    tokens: list[int]
    """The generated tokens (without the prompt)."""
    stats: PrefillStats
    ttft_s: float = 0.0
    """From the call to the first generated token's logits."""
    total_s: float = 0.0
    store: Future | None = None
    """The asynchronous store of the prompt's new chunks (None when nothing was stored)."""


def _check_model(model, source) -> None:
    """``source.check_model(config)`` where the source has its own rule (layer-type-aware clients), else
    :func:`check_supported`."""
    getattr(source, "check_model", check_supported)(model.config)


def _check_layout(layout: KVLayout, model, source=None) -> None:
    _check_model(model, source)
    want = KVLayout.from_hf_config(model.config, model_id="check", dtype=layout.dtype)
    if (layout.num_layers, layout.num_kv_heads, layout.head_dim) != (want.num_layers, want.num_kv_heads,
                                                                     want.head_dim):
        raise InvalidRequest(f"client layout {layout.num_layers}x{layout.num_kv_heads}x{layout.head_dim} does not "
                             f"match the model ({want.num_layers}x{want.num_kv_heads}x{want.head_dim})")
    if str(model.dtype).removeprefix("torch.") != layout.dtype:
        raise InvalidRequest(f"client layout dtype {layout.dtype} does not match the model dtype {model.dtype}")


def _as_ids(input_ids, device) -> torch.Tensor:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids))
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InvalidRequest(f"expected one sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.to(device)


def run_forward(model, ids: torch.Tensor, cache, want_logits: bool = True) -> torch.Tensor | None:
    """One forward pass of ``ids`` on top of ``cache`` (filled in place); the last position's logits or None."""
    kwargs: dict[str, Any] = {cache_kwarg(model): cache, "use_cache": True}
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            kwargs[name] = 1
            break
    out = model(input_ids=ids, **kwargs)
    return out.logits[:, -1] if want_logits else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, input_ids, source=None, *, lookup_len: int | None = None, logits: bool = True,
            lookahead: int = 4, device_decode: bool = False) -> PrefillResult:
    """Prefill ``input_ids`` (one sequence), reusing the longest prefix of ``input_ids[:lookup_len]`` that
    ``source`` (a :class:`kdn.client.KDNClient` or :class:`~kdn.client.host_cache.HostKVCache`) holds.

    Layers of the hit are decoded in a background thread while the model computes the suffix, each layer's
    attention waiting only for its own layer. ``lookup_len`` defaults to all tokens but the last (so there is
    always one to compute when ``logits`` is True). If a layer cannot be delivered, the whole prompt is recomputed
    (``stats.fallback`` says why). Remote failures never raise: they shrink the hit. ``device_decode=True`` hands the
    codec GPU memory to decode into (for a codec with a GPU decoder); by default it decodes into pinned host memory
    and the loader copies each layer group to the GPU asynchronously.
    """
    device = model.device
    ids = _as_ids(input_ids, device)
    n = ids.shape[1]
    limit = n - 1 if logits else n
    lookup_len = limit if lookup_len is None else min(lookup_len, limit)
    stats = PrefillStats(prompt_tokens=n)
    loader = None
    with torch.no_grad():
        if source is not None and lookup_len > 0:
            _check_layout(source.layout, model, source)
            direct = device_decode and device.type == "cuda"
            t0 = time.perf_counter()
            # Layer-major where the source can (a remote node's layers arrive while earlier ones are computed): a
            # layer that cannot be delivered intact raises in the loader, and the prompt is recomputed below.
            more = {"layer_major": True} if getattr(source, "streams_layers", False) else {}
            stream = source.retrieve_layers(ids[0, :lookup_len].tolist(), device=device if direct else "cpu",
                                            max_tokens=lookup_len, **more)
            stream = fast_source(stream, device)  # raw objects in a same-host node's shared memory
            stats.retrieve_s = time.perf_counter() - t0
            if stream.num_tokens:
                stats.hit_tokens, stats.bytes = stream.num_tokens, stream.bytes
                stats.layer_major = getattr(stream, "arrival", None) is not None
                loader = LayerLoader(stream, source.layout, device=device, lookahead=lookahead,
                                     direct=True if direct else None).start()
        try:
            t0 = time.perf_counter()
            if loader is None:
                cache = DynamicCache()
                out = run_forward(model, ids, cache, logits)
            else:
                cache = KDNPrefixCache(loader.fetch, stats.hit_tokens, source.layout.num_layers)
                try:
                    if stats.hit_tokens < n:
                        out = run_forward(model, ids[:, stats.hit_tokens:], cache, logits)
                    else:
                        out = None
                    cache.materialize()
                except PrefixLoadError as exc:
                    log.warning("cached prefix lost mid-prefill (%s); recomputing %d tokens", exc, n)
                    log.debug("prefix load failure", exc_info=exc.__cause__ or exc)
                    stats.fallback, stats.hit_tokens = str(exc), 0
                    loader.close()
                    cache = DynamicCache()
                    out = run_forward(model, ids, cache, logits)
            _sync(device)
            stats.prefill_s = time.perf_counter() - t0
        finally:
            if loader is not None:
                loader.close()
                stats.load_wait_s = loader.trace.wait_s
                stats.trace = loader.trace.summary()
    stats.computed_tokens = n - stats.hit_tokens
    return PrefillResult(cache, out, stats)


class _FirstToken(LogitsProcessor):
    """Records when ``generate`` produced its first logits."""

    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.at:
            self.at = time.perf_counter()
        return scores


def kdn_generate(model, tokenizer, prompt, client=None, *, max_new_tokens: int = 32, store: bool = True,
                 **generate_kwargs: Any) -> GenerateResult:
    """Generate from ``prompt`` (text, or a list/tensor of token ids), reusing cached prefix KV from ``client``.

    The longest cached prefix of the prompt (all but its last token) is loaded layer by layer while the rest is
    prefilled; the prompt's new chunks are then queued for storage (``client.store`` is asynchronous) and
    ``model.generate`` continues from the filled cache with ``generate_kwargs``. Greedy output is the same as
    without KDN for lossless codecs. Raises :class:`kdn.errors.InvalidRequest` for unsupported models.
    """
    t_start = time.perf_counter()
    _check_model(model, client)
    if isinstance(prompt, str):
        prompt = tokenizer(prompt, return_tensors="pt").input_ids
    ids = _as_ids(prompt, model.device)
    n = ids.shape[1]
    if n >= 2:
        pre = prefill(model, ids[:, :n - 1], client, lookup_len=n - 1, logits=False)
    else:
        pre = PrefillResult(DynamicCache(), None, PrefillStats(prompt_tokens=n))
    pre.stats.prompt_tokens, pre.stats.computed_tokens = n, n - pre.stats.hit_tokens
    pending = None
    if store and client is not None and n >= 2 and pre.stats.hit_tokens < n - 1:
        kv = kv_from_cache(pre.cache, n - 1)
        pending = client.store(ids[0, :n - 1].tolist(), kv, copy=False)
    first = _FirstToken()
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(first)
    kwargs = {cache_kwarg(model): pre.cache} if n >= 2 else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             logits_processor=processors, **kwargs, **generate_kwargs)
    new = out[0, n:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    end = time.perf_counter()
    return GenerateResult(text=text, tokens=new, stats=pre.stats, ttft_s=(first.at or end) - t_start,
                          total_s=end - t_start, store=pending)
