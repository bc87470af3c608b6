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

*Preemption between layers*: :class:`PrefillJob` runs one prompt's pass as steps of one (or a few) layers, so a
server can switch requests at layer boundaries (:mod:`kdn.client.prefill_schedule`'s ``srjf-preemptive``). A
paused job holds only its hidden states ``[tokens, hidden]`` (and, with a KDN hit, the loader's decoded-ahead
prefix group); its mask, rotary tables and layer buffer are rebuilt when it resumes.

Memory is measured, not estimated: :class:`KVMeter` follows the storages of the KV tensors the cache and the loader
create (weak references, so a freed buffer stops counting the moment it is freed) and :class:`TensorMeter` follows
every tensor the forward pass allocates. ``docs/prefill_only.md`` has the design and numbers.
"""

from __future__ import annotations

import inspect
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

from connectors.hf.cache import PrefixLoadError, cache_kwarg, check_supported
from connectors.hf.generate import _as_ids, _check_layout, _sync
from connectors.hf.loader import LayerLoader
from kdn.client.same_host import fast_source
from kdn.errors import InvalidRequest

__all__ = ["score", "ScoreResult", "ScoreStats", "LayerwiseKVCache", "KVMeter", "TensorMeter", "mlp_chunking",
           "pass_bytes", "plan_batches", "PrefillJob"]

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
    prefill). ``update(k, v, i)`` writes layer ``i``'s prefix and the new ``k``/``v`` into one reusable buffer
    ``[2, batch, heads, prefix + new, dim]`` and returns views of it; the next layer's update overwrites it.
    ``fetch(i)`` gives layer ``i``'s prefix as ``[2, tokens, heads, dim]`` (one sequence) or a list of those, one
    per batch row (each at least ``prefix_len`` tokens; the first ``prefix_len`` are used). ``sink(i, buffer)``,
    when given, sees each layer's full KV first (to stream it into KDN). Holding only one layer, it cannot be
    decoded from: :meth:`get_seq_length` stays at the prefix length after the forward.
    """

    def __init__(self, num_layers: int, prefix_len: int = 0,
                 fetch: Callable[[int], torch.Tensor | Sequence[torch.Tensor]] | None = None,
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
            got = self._fetch(layer_idx)
            rows = [got] if isinstance(got, torch.Tensor) else list(got)
            if len(rows) != b:
                raise PrefixLoadError(f"layer {layer_idx}: {len(rows)} prefixes for a batch of {b}")
            for row, kv in enumerate(rows):  # [2, >= p, heads, dim]
                if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] < p or tuple(kv.shape[2:]) != (h, d):
                    raise PrefixLoadError(f"layer {layer_idx} prefix KV has shape {tuple(kv.shape)}, want "
                                          f"{(2, p, h, d)}")
                buf[:, row, :, :p].copy_(kv[:, :p].permute(0, 2, 1, 3))
            del rows, got
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
        if x.dim() != 3 or x.shape[0] * x.shape[1] <= chunk:
            return forward(x)
        flat = x.reshape(-1, x.shape[-1])  # a batch's tokens, chunked together (the MLP is per position)
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk):
            out[start:start + chunk] = forward(flat[start:start + chunk])
        return out.view_as(x)
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
    """The pass's time (shared by the prompts of a batch)."""
    kv_peak_bytes: int = 0
    """Peak bytes of KV alive at once during the pass (measured: :class:`KVMeter`; the whole batch's)."""
    layer_kv_bytes: int = 0
    """One layer's KV of the whole pass (the cache's buffer: every row of the batch, padding included)."""
    full_kv_bytes: int = 0
    """What a normal prefill's cache holds at its end: every layer's KV of the pass."""
    batch_size: int = 1
    """Prompts computed together in this prompt's pass."""
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
          store: bool = False, mlp_chunk: int | None = 1024, lookahead: int = 1,
          batch_bytes: int | None = None) -> list[ScoreResult]:
    """Next-token distributions of ``prompts`` (texts or token-id lists; one is fine), one output token each.

    Each prompt's longest cached prefix (up to all but its last token) is loaded from ``source`` (a
    :class:`kdn.client.KDNClient` or :class:`~kdn.client.host_cache.HostKVCache`) layer by layer while the suffix
    is computed holding one layer's KV (:class:`LayerwiseKVCache`), the MLP chunked by ``mlp_chunk`` tokens.
    ``lookahead`` bounds the prefix layer groups decoded ahead of the model. ``labels`` (token ids, or strings
    whose single token is used) adds their renormalized probabilities. ``store=True`` streams each layer's KV to
    a host buffer as it is computed and queues the prompt's chunks for storage in ``source``.

    By default prompts run one at a time (prefill is compute-bound, so batching adds latency, as PrefillOnly
    observes); order them with :class:`kdn.client.prefill_schedule.PrefillScheduler`. ``batch_bytes`` batches
    them instead: prompts with the same cached prefix length (from ``source.lookup``) are grouped shortest
    uncached part first, as many per pass as :func:`pass_bytes` estimates to fit ``batch_bytes``, their suffixes
    right-padded (a pad follows every real token, so the causal mask keeps it out of their attention) and each
    row's logits taken at its own last token. Results keep the order of ``prompts``. Remote failures shrink the
    hit; a prefix lost mid-pass is recomputed (``stats.fallback``). Raises :class:`kdn.errors.InvalidRequest` for
    unsupported models or bad labels.
    """
    check_supported(model.config)
    if isinstance(prompts, (str, torch.Tensor)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    label_ids = _label_ids(tokenizer, labels)
    if batch_bytes is not None and batch_bytes <= 0:
        raise InvalidRequest(f"batch_bytes must be > 0, got {batch_bytes}")
    seqs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InvalidRequest("text prompts need a tokenizer")
            prompt = tokenizer(prompt, return_tensors="pt").input_ids
        ids = _as_ids(prompt, model.device)
        if ids.shape[1] < 1:
            raise InvalidRequest("empty prompt")
        seqs.append(ids)
    if source is not None:
        _check_layout(source.layout, model)
    if batch_bytes is None or len(seqs) < 2:
        batches = [[i] for i in range(len(seqs))]
    else:
        hits = [_lookup(source, ids) for ids in seqs]
        batches = plan_batches(model, [ids.shape[1] for ids in seqs], hits, batch_bytes, mlp_chunk)
    results: list[ScoreResult | None] = [None] * len(seqs)
    for batch in batches:
        for i, r in zip(batch, _score_batch(model, [seqs[i] for i in batch], source, label_ids, store, mlp_chunk,
                                            lookahead)):
            results[i] = r
    return results  # type: ignore[return-value]


def _lookup(source, ids: torch.Tensor) -> int:
    """Cached leading tokens of ``ids`` (all but the last), 0 without a source; a hint for batching only."""
    n = ids.shape[1]
    if source is None or n < 2 or not hasattr(source, "lookup"):
        return 0
    hit = source.lookup(ids[0, :n - 1].tolist())
    return int(getattr(hit, "hit_tokens", hit))


def pass_bytes(config, batch: int, prefix: int, suffix: int, mlp_chunk: int | None = None,
               elem_bytes: int = 4) -> int:
    """Estimated peak bytes of the tensors one prefill-only pass allocates (weights excluded) for ``batch`` rows
    of ``prefix`` cached + ``suffix`` computed tokens (padding included): the layer buffer, the new K/V with
    their rotated copies, the residual stream, attention's mask (and scores for ``eager`` attention), the MLP's
    intermediates (one ``mlp_chunk`` of them when chunked) and the logits. An upper bound within about 2x of
    :class:`TensorMeter`'s measured peak on SmolLM2 (SDPA, CPU; ``tests/test_prefill_only.py``)."""
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokens, total = batch * suffix, prefix + suffix
    inter = tokens if not mlp_chunk else min(tokens, mlp_chunk)
    per_token = (6 * config.hidden_size + 2 * heads * head_dim + 6 * kv_heads * head_dim) * elem_bytes
    layer_kv = 2 * batch * kv_heads * total * head_dim * elem_bytes
    # a boolean mask; "eager" attention also materializes the scores and their softmax (SDPA, flash: tiled)
    eager = getattr(config, "_attn_implementation", None) == "eager"
    attention = batch * suffix * total * (1 + (2 * heads * elem_bytes if eager else 0))
    mlp = 3 * inter * config.intermediate_size * elem_bytes
    return tokens * per_token + layer_kv + attention + mlp + batch * config.vocab_size * 8


def plan_batches(model, lengths: Sequence[int], hits: Sequence[int], batch_bytes: int,
                 mlp_chunk: int | None = None) -> list[list[int]]:
    """Shortest-first batches of prompt indices: equal cached prefix (``hits``), shortest uncached part first,
    each batch the most prompts whose padded pass fits ``batch_bytes`` (:func:`pass_bytes`); a prompt that does
    not fit alone runs alone."""
    if len(lengths) != len(hits):
        raise InvalidRequest("lengths and hits differ in length")
    elem = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    order = sorted(range(len(lengths)), key=lambda i: (hits[i], lengths[i] - hits[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            last = batches[-1]
            prefix = hits[last[0]]
            suffix = max(lengths[i], *(lengths[j] for j in last)) - prefix
            if hits[i] == prefix and pass_bytes(model.config, len(last) + 1, prefix, suffix, mlp_chunk,
                                                elem) <= batch_bytes:
                last.append(i)
                continue
        batches.append([i])
    return batches


def _logits_kwarg(model) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def _forward_last(model, ids: torch.Tensor, last: list[int], cache) -> torch.Tensor:
    """One pass of the right-padded ``ids`` ``[batch, suffix]``; row ``b``'s logits at position ``last[b]``."""
    kwargs: dict[str, Any] = {cache_kwarg(model): cache, "use_cache": True}
    keep = torch.tensor(last, device=ids.device)
    name = _logits_kwarg(model)
    if name == "logits_to_keep":
        kwargs[name] = keep[:, None]  # a 2-D integer tensor: one position per row
        return model(input_ids=ids, **kwargs).logits[:, 0]
    logits = model(input_ids=ids, **kwargs).logits
    return logits[torch.arange(ids.shape[0], device=ids.device), keep]


def _close(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _score_batch(model, seqs: list[torch.Tensor], source, label_ids: list[int] | None, store: bool,
                 mlp_chunk: int | None, lookahead: int, *, use_source: bool = True) -> list[ScoreResult]:
    device = model.device
    lengths = [ids.shape[1] for ids in seqs]
    b = len(seqs)
    meter = KVMeter()
    loaders: list[LayerLoader] = []
    prefix, retrieve_s = 0, 0.0
    num_layers = len(_decoder_layers(model))
    with torch.no_grad():
        if use_source and source is not None and min(lengths) > 1:
            t0 = time.perf_counter()
            # layer-major where the source can: a remote node's layers arrive while earlier ones are computed
            more = {"layer_major": True} if getattr(source, "streams_layers", False) else {}
            streams = [fast_source(source.retrieve_layers(ids[0, :n - 1].tolist(), device="cpu", max_tokens=n - 1,
                                                          **more), device) for ids, n in zip(seqs, lengths)]
            retrieve_s = time.perf_counter() - t0
            prefix = min(st.num_tokens for st in streams)
            if b > 1 and len({st.num_tokens for st in streams}) > 1:
                # the cache changed since the batch was planned: run its prompts one at a time
                for st in streams:
                    _close(st)
                return [r for ids in seqs for r in _score_batch(model, [ids], source, label_ids, store, mlp_chunk,
                                                                  lookahead)]
            if prefix:
                loaders = [LayerLoader(_MeteredSource(st, meter), source.layout, device=device,
                                       lookahead=lookahead).start() for st in streams]
            else:
                for st in streams:
                    _close(st)
        host = _HostSink(num_layers, lengths) if store and source is not None and hasattr(source, "store") else None
        fallback = ""
        try:
            t0 = time.perf_counter()
            with mlp_chunking(model, mlp_chunk):
                def fetch(layer: int) -> list[torch.Tensor]:
                    return [loader.fetch(layer) for loader in loaders]

                cache = LayerwiseKVCache(num_layers, prefix, fetch if loaders else None, sink=host, meter=meter)
                try:
                    logits = _forward_last(model, _padded(seqs, prefix), [n - prefix - 1 for n in lengths], cache)
                except PrefixLoadError as exc:
                    log.warning("cached prefix lost mid-prefill (%s); recomputing %d prompts", exc, b)
                    for loader in loaders:
                        loader.close()
                    if b > 1:
                        out = [r for ids in seqs for r in _score_batch(model, [ids], source, label_ids, store,
                                                                         mlp_chunk, lookahead, use_source=False)]
                        for r in out:
                            r.stats.fallback = str(exc)
                        return out
                    fallback, prefix = str(exc), 0
                    cache = LayerwiseKVCache(num_layers, 0, sink=host, meter=meter)
                    logits = _forward_last(model, _padded(seqs, 0), [lengths[0] - 1], cache)
            _sync(device)
            prefill_s = time.perf_counter() - t0
            layer_bytes = cache.layer_bytes
            del cache
        finally:
            for loader in loaders:
                loader.close()
        pending: list[Future | None] = [None] * b
        if host is not None and host.complete:
            for row, ids in enumerate(seqs):
                if prefix < lengths[row]:
                    pending[row] = source.store(ids[0].tolist(), host.kv[row], copy=False)
    logprobs = torch.log_softmax(logits.float(), -1).cpu()
    out = []
    for row, n in enumerate(lengths):
        stats = ScoreStats(prompt_tokens=n, hit_tokens=prefix, computed_tokens=n - prefix, retrieve_s=retrieve_s,
                           prefill_s=prefill_s, kv_peak_bytes=meter.peak, layer_kv_bytes=layer_bytes,
                           full_kv_bytes=layer_bytes * num_layers, batch_size=b, fallback=fallback)
        lp = logprobs[row]
        label_probs = None
        if label_ids is not None:
            if max(label_ids) >= lp.shape[0] or min(label_ids) < 0:
                raise InvalidRequest(f"label token ids {label_ids} are outside the vocabulary ({lp.shape[0]})")
            sel = torch.softmax(lp[label_ids], -1)
            label_probs = {tok: float(p) for tok, p in zip(label_ids, sel)}
        out.append(ScoreResult(lp, int(lp.argmax()), label_probs, stats, pending[row]))
    return out


def _padded(seqs: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """The uncached suffixes ``[batch, longest]``, right-padded with each row's last token."""
    width = max(ids.shape[1] for ids in seqs) - prefix
    if len(seqs) == 1:
        return seqs[0][:, prefix:]
    out = torch.empty((len(seqs), width), dtype=seqs[0].dtype, device=seqs[0].device)
    for row, ids in enumerate(seqs):
        suffix = ids[0, prefix:]
        out[row, :suffix.shape[0]] = suffix
        out[row, suffix.shape[0]:] = suffix[-1]
    return out


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


class _HostSink:
    """Copies each layer's KV of every row (its real tokens) into host tensors ``[layers, 2, tokens, heads, dim]``
    as it is computed, so the prompts can be stored in KDN although the device never holds more than one layer."""

    def __init__(self, num_layers: int, lengths: Sequence[int]) -> None:
        self.num_layers, self.lengths = num_layers, list(lengths)
        self.kv: list[torch.Tensor] | None = None
        self._done: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self._done) == self.num_layers

    def __call__(self, layer: int, buf: torch.Tensor) -> None:
        if buf.shape[1] != len(self.lengths) or buf.shape[3] < max(self.lengths):
            return  # not these prompts' full sequences: store nothing
        cuda = buf.device.type == "cuda"
        if self.kv is None:
            _, _, h, _, d = buf.shape
            self.kv = [torch.empty((self.num_layers, 2, n, h, d), dtype=buf.dtype, pin_memory=cuda)
                       for n in self.lengths]
        for row, n in enumerate(self.lengths):
            self.kv[row][layer].copy_(buf[:, row, :, :n].transpose(1, 2), non_blocking=cuda)
        self._done.add(layer)


# -- preemptible execution ---------------------------------------------------------------------------------------
class _LayerInputs(Exception):
    """Raised by the capture hook on the first decoder layer: the model's own per-layer arguments are ready."""


class PrefillJob:
    """One prompt's prefill-only pass, run as resumable steps of whole layers (preemption at layer boundaries).

    ``step(layers)`` runs the next ``layers`` decoder layers (after the last one, the final norm and lm head) and
    returns True once the job is done; :meth:`result` then gives the :class:`ScoreResult` that :func:`score` gives
    for the same prompt (the same decoder layers on the same inputs: identical on a deterministic backend).
    :meth:`pause` drops everything but the hidden states ``[1, tokens, hidden]`` — the attention mask, rotary
    tables and the layer buffer are rebuilt by the model's own code when the next ``step`` resumes the job (that
    rebuild is the switch cost), so a paused job holds :attr:`held_bytes` of tensors, plus, with a KDN hit, the
    loader's at most ``lookahead`` decoded-ahead prefix groups, and with ``store=True`` the host copy of the layers
    done so far. Arguments are :func:`score`'s, for one prompt. Not thread-safe; a model may run several jobs
    interleaved from one thread (each step patches only for its own duration, as :func:`mlp_chunking`).
    """

    def __init__(self, model, tokenizer, prompt, source=None, *, labels: Sequence[int | str] | None = None,
                 store: bool = False, mlp_chunk: int | None = 1024, lookahead: int = 1) -> None:
        check_supported(model.config)
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InvalidRequest("text prompts need a tokenizer")
            prompt = tokenizer(prompt, return_tensors="pt").input_ids
        self.ids = _as_ids(prompt, model.device)
        if self.ids.shape[0] != 1:
            raise InvalidRequest(f"a PrefillJob is one prompt, got a batch of {self.ids.shape[0]}")
        n = self.ids.shape[1]
        if n < 1:
            raise InvalidRequest("empty prompt")
        if source is not None:
            _check_layout(source.layout, model)
        self.model, self.source, self.mlp_chunk = model, source, mlp_chunk
        self.label_ids = _label_ids(tokenizer, labels)
        self._layers = _decoder_layers(model)
        self.num_layers = len(self._layers)
        self.layers_done = 0
        self.switches = 0
        """Times the job was resumed after a pause."""
        self.compute_s = 0.0
        self.retrieve_s = 0.0
        self._meter = KVMeter()
        self._loader: LayerLoader | None = None
        self._prefix = 0
        self._fallback = ""
        self._host = _HostSink(self.num_layers, [n]) if store and source is not None and hasattr(source, "store") \
            else None
        self._lookahead = lookahead
        self._hidden: torch.Tensor | None = None
        self._inputs: tuple[tuple, dict] | None = None  # the layer's args/kwargs while active (mask, rotary, ...)
        self._cache: LayerwiseKVCache | None = None
        self._layer_bytes = 0
        self._result: ScoreResult | None = None
        self._started = False

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def remaining_layers(self) -> int:
        return 0 if self.done else self.num_layers - self.layers_done

    @property
    def active(self) -> bool:
        """True between a step and the next :meth:`pause` (the working state is held)."""
        return self._inputs is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of the tensors the job holds between steps: the hidden states when paused."""
        h = 0 if self._hidden is None else self._hidden.untyped_storage().nbytes()
        if self._cache is not None:
            h += self._cache.layer_bytes
        if self._inputs is not None:
            seen = {id(self._hidden.untyped_storage())} if self._hidden is not None else set()
            for t in _tensors(self._inputs):
                st = t.untyped_storage()
                if id(st) not in seen:
                    seen.add(id(st))
                    h += st.nbytes()
        return h

    def pause(self) -> None:
        """Drop the working state (mask, rotary tables, layer buffer): only the hidden states stay."""
        self._inputs = None
        if self._cache is not None:
            self._cache._buf = None

    def close(self) -> None:
        """Abandon the job (frees its state and stops its loader); idempotent."""
        self.pause()
        self._hidden = None
        self._cache = None
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    # -- running -------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Rebuild a paused job's working state now (:meth:`step` does it when needed): the switch cost."""
        if self._started and self._inputs is None and not self.done:
            self.switches += 1
            with torch.no_grad():
                self._activate()

    def step(self, layers: int = 1) -> bool:
        """Run the next ``layers`` decoder layers (fewer at the end); True when the job is done."""
        if layers < 1:
            raise InvalidRequest(f"layers must be >= 1, got {layers}")
        if self.done:
            return True
        t0 = time.perf_counter()
        with torch.no_grad():
            if not self._started:
                self._start()
            else:
                self.resume()
            end = min(self.num_layers, self.layers_done + layers)
            try:
                with _mlp_chunking_layers(self._layers[self.layers_done:end], self.mlp_chunk):
                    while self.layers_done < end:
                        self._run_layer(self.layers_done)
                        self.layers_done += 1
            except PrefixLoadError as exc:
                log.warning("cached prefix lost mid-prefill (%s); recomputing the prompt", exc)
                self._restart_without_prefix(str(exc))
                self.compute_s += time.perf_counter() - t0
                return False
            if self.layers_done == self.num_layers:
                self._finish()
        _sync(self.model.device)
        self.compute_s += time.perf_counter() - t0
        return self.done

    def run(self) -> ScoreResult:
        """Run the remaining layers at once (uninterrupted) and return the result."""
        while not self.step(self.num_layers):
            pass
        return self.result()

    def result(self) -> ScoreResult:
        if self._result is None:
            raise InvalidRequest(f"the job has {self.remaining_layers} layers left")
        return self._result

    def _start(self) -> None:
        self._started = True
        n = self.ids.shape[1]
        if self.source is not None and n > 1:
            t0 = time.perf_counter()
            more = {"layer_major": True} if getattr(self.source, "streams_layers", False) else {}
            stream = fast_source(self.source.retrieve_layers(self.ids[0, :n - 1].tolist(), device="cpu",
                                                             max_tokens=n - 1, **more), self.model.device)
            self.retrieve_s = time.perf_counter() - t0
            self._prefix = stream.num_tokens
            if self._prefix:
                self._loader = LayerLoader(_MeteredSource(stream, self._meter), self.source.layout,
                                           device=self.model.device, lookahead=self._lookahead).start()
            else:
                _close(stream)
        self._new_cache()
        self._capture(self.ids[:, self._prefix:], None)

    def _new_cache(self) -> None:
        loader = self._loader
        fetch = (lambda layer: loader.fetch(layer)) if loader is not None else None
        self._cache = LayerwiseKVCache(self.num_layers, self._prefix, fetch, sink=self._host, meter=self._meter)

    def _activate(self) -> None:
        """Rebuild the mask and rotary tables from the current hidden states (nothing is embedded again)."""
        self._capture(None, self._hidden)

    def _capture(self, ids: torch.Tensor | None, embeds: torch.Tensor | None) -> None:
        """Run the model's own forward up to its first decoder layer; keep that layer's inputs."""
        got: list = []

        def hook(module, args, kwargs):
            got.append((args, kwargs))
            raise _LayerInputs

        base = getattr(self.model, "model", self.model)
        handle = self._layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            base(input_ids=ids, inputs_embeds=embeds, use_cache=True, **{cache_kwarg(base): self._cache})
        except _LayerInputs:
            pass
        finally:
            handle.remove()
        args, kwargs = got[0]
        if embeds is None:
            self._hidden = args[0] if args else kwargs.pop("hidden_states")
        self._inputs = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def _run_layer(self, i: int) -> None:
        args, kwargs = self._inputs  # type: ignore[misc]
        out = self._layers[i](self._hidden, *args, **kwargs)
        self._hidden = out[0] if isinstance(out, tuple) else out
        self._layer_bytes = self._cache.layer_bytes

    def _restart_without_prefix(self, why: str) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        self._fallback, self._prefix, self.layers_done = why, 0, 0
        self._hidden, self._inputs = None, None
        self._new_cache()
        self._capture(self.ids, None)

    def _finish(self) -> None:
        base = getattr(self.model, "model", self.model)
        hidden = base.norm(self._hidden)[:, -1:]
        self._hidden = None
        self.pause()
        self._cache = None
        logits = self.model.lm_head(hidden)[:, -1]
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        n = self.ids.shape[1]
        pending = None
        if self._host is not None and self._host.complete and self._prefix < n:
            pending = self.source.store(self.ids[0].tolist(), self._host.kv[0], copy=False)
        lp = torch.log_softmax(logits.float(), -1).cpu()[0]
        stats = ScoreStats(prompt_tokens=n, hit_tokens=self._prefix, computed_tokens=n - self._prefix,
                           retrieve_s=self.retrieve_s, prefill_s=self.compute_s, kv_peak_bytes=self._meter.peak,
                           layer_kv_bytes=self._layer_bytes, full_kv_bytes=self._layer_bytes * self.num_layers,
                           fallback=self._fallback)
        label_probs = None
        if self.label_ids is not None:
            if max(self.label_ids) >= lp.shape[0] or min(self.label_ids) < 0:
                raise InvalidRequest(f"label token ids {self.label_ids} are outside the vocabulary ({lp.shape[0]})")
            sel = torch.softmax(lp[self.label_ids], -1)
            label_probs = {tok: float(p) for tok, p in zip(self.label_ids, sel)}
        self._result = ScoreResult(lp, int(lp.argmax()), label_probs, stats, pending)


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


@contextmanager
def _mlp_chunking_layers(layers: Sequence[torch.nn.Module], chunk: int | None) -> Iterator[None]:
    """:func:`mlp_chunking` for the given decoder layers only (one step's)."""
    if not chunk:
        yield
        return
    patched = []
    try:
        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is None or "forward" in vars(mlp):
                continue
            mlp.forward = _chunked(mlp.forward, chunk)
            patched.append(mlp)
        yield
    finally:
        for mlp in patched:
            del mlp.forward
