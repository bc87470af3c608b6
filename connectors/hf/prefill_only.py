"""Prefill-only requests (PrefillOnly, arXiv 2505.07203): one output token, holding one layer's KV at a time.

Discriminative uses of an LLM (ranking, labeling, guardrails, credit checks) need only the next-token distribution
of a long prompt. Nothing decodes afterwards, so a layer's KV is dead as soon as that layer's attention has run.
:func:`score` runs the model's own forward pass over a :class:`LayerwiseKVCache` that keeps **one layer buffer**:
layer ``i``'s update copies the cached prefix of layer ``i`` (loaded from KDN layer by layer by the
:class:`~connectors.hf.loader.LayerLoader`, one group ahead) and the suffix's new K/V into it, hands it to
attention, and layer ``i + 1`` overwrites it. The whole-model cache never exists. With ``store=True`` each layer is
also copied into a host buffer as it goes and the prompt's chunks are queued for storage in KDN.

*Hybrid prefilling* (the paper's other half): the MLP's intermediate tensors (``intermediate_size`` values per
token, 14x one layer's KV on Llama-3-8B) dominate peak memory once the KV is gone, so ``mlp_chunk`` runs every
layer's MLP ``mlp_chunk`` tokens at a time (it is position-wise, so the result is the same up to float rounding)
while attention runs over the whole sequence.

Memory is measured, not estimated: :class:`KVMeter` follows the storages of the KV tensors the cache and the loader
create (weak references, so a freed buffer stops counting the moment it is freed) and :class:`TensorMeter` follows
every tensor the forward pass allocates. ``docs/prefill_only.md`` has the design and numbers.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from connectors.hf.cache import PrefixLoadError, check_supported
from connectors.hf.generate import _as_ids, _check_layout, _sync, run_forward
from connectors.hf.loader import LayerLoader
from kdn.client.same_host import fast_source
from kdn.errors import InvalidRequest

__all__ = ["score", "ScoreResult", "ScoreStats", "LayerwiseKVCache", "KVMeter", "TensorMeter", "mlp_chunking"]

log = logging.getLogger(__name__)


# -- measuring ---------------------------------------------------------------------------------------------------
class _StorageMeter:
    """Live and peak bytes of registered storages; a storage stops counting when it is freed (weakref)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # id(storage object) -> nbytes
        self._lock = threading.Lock()

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = id(storage)
        with self._lock:
            if not nbytes or key in self._seen:
                return
            self._seen[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.live -= self._seen.pop(key, 0)


class KVMeter(_StorageMeter):
    """Bytes of KV alive at once: the cache's buffers, the new K/V of the layer being computed and the prefix
    layers the loader has decoded ahead. ``peak`` is the prefill's peak KV memory."""


class TensorMeter(TorchDispatchMode):
    """Peak bytes of all tensors allocated inside ``with TensorMeter() as m:`` (like CUDA's max_memory_allocated,
    for any device; tensors created before the block, e.g. the weights, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.meter = _StorageMeter()

    @property
    def peak(self) -> int:
        return self.meter.peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_ptr(t) for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta and _ptr(t) not in inputs:  # views, in-place: not new
                self.meter.add(t)
        return out


def _ptr(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.untyped_storage().data_ptr()


class _MeteredSource:
    """A layer source whose decoded groups (the loader's prefix KV) are counted by a :class:`KVMeter`."""

    def __init__(self, source, meter: KVMeter) -> None:
        self._source, self._meter = source, meter
        self.num_tokens, self.bytes = source.num_tokens, source.bytes
        self.writes_device = getattr(source, "writes_device", False)

    def groups(self):
        return self._source.groups()

    def decode_group(self, layer_start: int, layer_end: int, out: torch.Tensor):
        self._meter.add(out)
        return self._source.decode_group(layer_start, layer_end, out=out)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


# -- the one-layer cache -----------------------------------------------------------------------------------------
class LayerwiseKVCache(DynamicCache):
    """A cache that holds the KV of one layer at a time, for a forward pass that is never decoded from.

    It reports ``prefix_len`` cached tokens for every layer (so positions and masks are those of a prefix-cached
    prefill). ``update(k, v, i)`` writes layer ``i``'s prefix (``fetch(i)`` -> ``[2, prefix, heads, dim]``) and
    the new ``k``/``v`` into one reusable buffer ``[2, batch, heads, prefix + new, dim]`` and returns views of it;
    the next layer's update overwrites it. ``sink(i, buffer)``, when given, sees each layer's full KV first (to
    stream it into KDN). Holding only one layer, it cannot be decoded from: :meth:`get_seq_length` stays at the
    prefix length after the forward.
    """

    def __init__(self, num_layers: int, prefix_len: int = 0, fetch: Callable[[int], torch.Tensor] | None = None,
                 *, sink: Callable[[int, torch.Tensor], None] | None = None, meter: KVMeter | None = None) -> None:
        super().__init__()
        if prefix_len and fetch is None:
            raise InvalidRequest("a cached prefix needs a fetch callback")
        self.num_layers = num_layers
        self._prefix_len = prefix_len
        self._fetch, self._sink, self._meter = fetch, sink, meter
        self._buf: torch.Tensor | None = None
        self.layers_seen = 0

    @property
    def layer_bytes(self) -> int:
        """Bytes of the one layer buffer (0 before the first update)."""
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._prefix_len

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        # 5.x: (query_length: int, layer_idx); 4.56+: (cache_position: Tensor, layer_idx).
        query = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        q = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self._prefix_len + q, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, s, d = key_states.shape
        p = self._prefix_len
        if self._meter is not None:
            self._meter.add(key_states)
            self._meter.add(value_states)
        shape = (2, b, h, p + s, d)
        if self._buf is None or self._buf.shape != shape or self._buf.dtype != key_states.dtype:
            self._buf = None  # free the old one first
            self._buf = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
            if self._meter is not None:
                self._meter.add(self._buf)
        buf = self._buf
        if p:
            kv = self._fetch(layer_idx)  # [2, p, heads, dim]
            if kv.shape != (2, p, h, d):
                raise PrefixLoadError(f"layer {layer_idx} prefix KV has shape {tuple(kv.shape)}, want "
                                      f"{(2, p, h, d)}")
            buf[:, :, :, :p].copy_(kv.permute(0, 2, 1, 3).unsqueeze(1))
            del kv
        buf[0, :, :, p:].copy_(key_states)
        buf[1, :, :, p:].copy_(value_states)
        if self._sink is not None:
            self._sink(layer_idx, buf)
        self.layers_seen += 1
        return buf[0], buf[1]


# -- hybrid prefilling -------------------------------------------------------------------------------------------
def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise InvalidRequest(f"{type(model).__name__} has no decoder layers at .model.layers")
    return layers


@contextmanager
def mlp_chunking(model, chunk: int | None) -> Iterator[None]:
    """Run every decoder layer's MLP ``chunk`` tokens at a time inside the block (None or 0: unchanged).

    The MLP acts on each position independently, so only the size of its intermediate tensors changes. Patches the
    modules' ``forward`` for the duration: do not run the same model from other threads meanwhile.
    """
    if not chunk:
        yield
        return
    patched = []
    try:
        for layer in _decoder_layers(model):
            mlp = getattr(layer, "mlp", None)
            if mlp is None or "forward" in vars(mlp):
                continue
            mlp.forward = _chunked(mlp.forward, chunk)
            patched.append(mlp)
        yield
    finally:
        for mlp in patched:
            del mlp.forward


def _chunked(forward: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] <= chunk:
            return forward(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[1], chunk):
            out[:, start:start + chunk] = forward(x[:, start:start + chunk])
        return out
    return run


# -- scoring -----------------------------------------------------------------------------------------------------
@dataclass
class ScoreStats:
    prompt_tokens: int = 0
    hit_tokens: int = 0
    """Leading tokens whose KV came from KDN."""
    computed_tokens: int = 0
    retrieve_s: float = 0.0
    prefill_s: float = 0.0
    kv_peak_bytes: int = 0
    """Peak bytes of KV alive at once during the prefill (measured: :class:`KVMeter`)."""
    layer_kv_bytes: int = 0
    """One layer's KV of the whole prompt (the cache's buffer)."""
    full_kv_bytes: int = 0
    """What a normal prefill's cache holds at its end: every layer's KV of the prompt."""
    fallback: str = ""
    """Why a hit was dropped and the prompt recomputed, or empty."""


@dataclass
class ScoreResult:
    logprobs: torch.Tensor
    """Log-probabilities of the next token ``[vocab]`` (float32, on the CPU)."""
    token: int
    """The greedy next token (the one a normal prefill + greedy decode would emit first)."""
    labels: dict[int, float] | None
    """For ``labels=``: each label token's probability, renormalized over the labels (P(Yes) of Yes/No)."""
    stats: ScoreStats
    store: Future | None = None
    """The asynchronous store of the prompt's chunks in KDN (None when nothing was stored)."""


def score(model, tokenizer, prompts, source=None, *, labels: Sequence[int | str] | None = None,
          store: bool = False, mlp_chunk: int | None = 1024, lookahead: int = 1) -> list[ScoreResult]:
    """Next-token distributions of ``prompts`` (texts or token-id lists; one is fine), one output token each.

    Each prompt's longest cached prefix (up to all but its last token) is loaded from ``source`` (a
    :class:`kdn.client.KDNClient` or :class:`~kdn.client.host_cache.HostKVCache`) layer by layer while the suffix
    is computed holding one layer's KV (:class:`LayerwiseKVCache`), the MLP chunked by ``mlp_chunk`` tokens.
    ``lookahead`` bounds the prefix layer groups decoded ahead of the model. ``labels`` (token ids, or strings
    whose single token is used) adds their renormalized probabilities. ``store=True`` streams each layer's KV to
    a host buffer as it is computed and queues the prompt's chunks for storage in ``source``. Prompts run one at a
    time (prefill is compute-bound, so batching adds latency, as PrefillOnly observes); order them with
    :class:`kdn.client.prefill_schedule.PrefillScheduler`. Remote failures shrink the hit; a prefix lost mid-pass
    is recomputed (``stats.fallback``). Raises :class:`kdn.errors.InvalidRequest` for unsupported models or bad
    labels.
    """
    check_supported(model.config)
    if isinstance(prompts, (str, torch.Tensor)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    label_ids = _label_ids(tokenizer, labels)
    results = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InvalidRequest("text prompts need a tokenizer")
            prompt = tokenizer(prompt, return_tensors="pt").input_ids
        results.append(_score_one(model, _as_ids(prompt, model.device), source, label_ids, store, mlp_chunk,
                                  lookahead))
    return results


def _label_ids(tokenizer, labels: Sequence[int | str] | None) -> list[int] | None:
    if labels is None:
        return None
    out = []
    for label in labels:
        if isinstance(label, str):
            if tokenizer is None:
                raise InvalidRequest("string labels need a tokenizer")
            ids = tokenizer(label, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise InvalidRequest(f"label {label!r} is {len(ids)} tokens, not one")
            label = ids[0]
        out.append(int(label))
    if not out:
        raise InvalidRequest("labels is empty")
    return out


def _score_one(model, ids: torch.Tensor, source, label_ids: list[int] | None, store: bool,
               mlp_chunk: int | None, lookahead: int) -> ScoreResult:
    device = model.device
    n = ids.shape[1]
    if n < 1:
        raise InvalidRequest("empty prompt")
    stats = ScoreStats(prompt_tokens=n)
    meter = KVMeter()
    loader = None
    pending = None
    with torch.no_grad():
        if source is not None and n > 1:
            _check_layout(source.layout, model)
            t0 = time.perf_counter()
            stream = fast_source(source.retrieve_layers(ids[0, :n - 1].tolist(), device="cpu", max_tokens=n - 1),
                                 device)
            stats.retrieve_s = time.perf_counter() - t0
            if stream.num_tokens:
                stats.hit_tokens = stream.num_tokens
                loader = LayerLoader(_MeteredSource(stream, meter), source.layout, device=device,
                                     lookahead=lookahead).start()
        num_layers = len(_decoder_layers(model))
        host = _HostSink(num_layers, n) if store and source is not None and hasattr(source, "store") else None
        try:
            t0 = time.perf_counter()
            with mlp_chunking(model, mlp_chunk):
                cache = LayerwiseKVCache(num_layers, stats.hit_tokens, loader.fetch if loader else None,
                                         sink=host, meter=meter)
                try:
                    logits = run_forward(model, ids[:, stats.hit_tokens:], cache)
                except PrefixLoadError as exc:
                    log.warning("cached prefix lost mid-prefill (%s); recomputing %d tokens", exc, n)
                    stats.fallback, stats.hit_tokens = str(exc), 0
                    loader.close()
                    cache = LayerwiseKVCache(num_layers, 0, sink=host, meter=meter)
                    logits = run_forward(model, ids, cache)
            _sync(device)
            stats.prefill_s = time.perf_counter() - t0
            stats.layer_kv_bytes = cache.layer_bytes
            del cache
        finally:
            if loader is not None:
                loader.close()
        if host is not None and host.complete and stats.hit_tokens < n:
            pending = source.store(ids[0].tolist(), host.kv, copy=False)
    stats.computed_tokens = n - stats.hit_tokens
    stats.kv_peak_bytes = meter.peak
    stats.full_kv_bytes = stats.layer_kv_bytes * num_layers
    logprobs = torch.log_softmax(logits[0].float(), -1).cpu()
    label_probs = None
    if label_ids is not None:
        if max(label_ids) >= logprobs.shape[0] or min(label_ids) < 0:
            raise InvalidRequest(f"label token ids {label_ids} are outside the vocabulary ({logprobs.shape[0]})")
        sel = torch.softmax(logprobs[label_ids], -1)
        label_probs = {tok: float(p) for tok, p in zip(label_ids, sel)}
    return ScoreResult(logprobs, int(logprobs.argmax()), label_probs, stats, pending)


class _HostSink:
    """Copies each layer's KV (the whole prompt's) into a host tensor ``[layers, 2, tokens, heads, dim]`` as it is
    computed, so the prompt can be stored in KDN although the device never holds more than one layer."""

    def __init__(self, num_layers: int, num_tokens: int) -> None:
        self.num_layers, self.num_tokens = num_layers, num_tokens
        self.kv: torch.Tensor | None = None
        self._done: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self._done) == self.num_layers

    def __call__(self, layer: int, buf: torch.Tensor) -> None:
        if buf.shape[1] != 1 or buf.shape[3] != self.num_tokens:
            return  # not this prompt's full sequence: store nothing
        if self.kv is None:
            _, _, h, t, d = buf.shape
            self.kv = torch.empty((self.num_layers, 2, t, h, d), dtype=buf.dtype,
                                  pin_memory=buf.device.type == "cuda")
        self.kv[layer].copy_(buf[:, 0].transpose(1, 2), non_blocking=buf.device.type == "cuda")
        self._done.add(layer)
