"""Layer-type-aware storage for hybrid models (sliding-window layers of window ``W`` plus full-attention layers).

A token past the first ``W`` never looks at a sliding layer's KV more than ``W - 1`` tokens back, so storing every
token of those layers wastes most of the bytes at long contexts. :class:`HybridClient` stores, per prompt:

- per chunk, one **full object** holding only the full-attention layers' KV, under the chunk's prefix-chain key (the
  layout is :meth:`KVLayout.part_layout` ``("full")``: its fingerprint commits to the whole model's layout);
- at chosen chunk boundaries ``b``, one **window object** holding the sliding layers' KV of tokens
  ``[b - W, b)`` (all of ``[0, b)`` when ``b < W``), keyed by :func:`window_key` of the chunk key ending at ``b``.

A prefix hit at ``b`` needs every full object up to ``b`` **and** the window object at ``b``; :meth:`lookup` and
:meth:`retrieve_layers` report only such hits. Window objects are written at the prompt's **last full-chunk
boundary** (where the next turn of a conversation, or the same prompt again, hits) and at the **divergence
boundary**: the end of the chain of full objects that already existed when the prompt was stored, i.e. where it
leaves a prefix some earlier prompt stored (a shared system prompt or document), when that boundary has no window
yet. So a prefix that two prompts have shared is hit by the third. Partial chunks are not stored (a hit there would
need one more window per prompt; a repeated prompt recomputes fewer than ``chunk_size`` tokens instead).
``docs/connectors/hf.md`` has the arithmetic: Gemma 3 270M at 8K tokens needs about 22 % of a full-layer store.

Built on :class:`KDNClient`'s public calls only (``keys``, ``lookup``, ``locate``, ``put_chunks``, ``get_chunks``,
``retrieve_layers``): one client per part layout. A layout without sliding layers makes this a thin wrapper of one
plain :class:`KDNClient` (same keys and objects as before).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from codec.raw import torch_dtype
from kdn.client.kdn_client import KDNClient, StoreResult
from kdn.config import ClientConfig
from kdn.errors import AuthError, InvalidRequest, KDNError
from kdn.format.chunk_codec import check_kv
from kdn.format.keys import DIGEST_BYTES, ChunkKey, ChunkSpan, KeyKind
from kdn.format.layout import KVLayout

__all__ = ["HybridClient", "HybridLookup", "HybridStream", "HybridStoreResult", "window_key"]

log = logging.getLogger(__name__)


def window_key(boundary: ChunkKey, fingerprint: bytes, window: int) -> ChunkKey:
    """The key of the window object at the end of the chunk keyed ``boundary`` (a prefix key: it commits to the
    tenant, the full part's layout and every token before the boundary), under the sliding part's ``fingerprint``
    and the window ``W``."""
    if boundary.kind is not KeyKind.PREFIX:
        raise InvalidRequest("window objects hang off prefix keys only")
    h = hashlib.blake2b(boundary.digest, digest_size=DIGEST_BYTES, person=b"kdn-window-v1")
    h.update(fingerprint + window.to_bytes(4, "little"))
    return ChunkKey(boundary.tenant, fingerprint, boundary.codec, KeyKind.PREFIX, h.digest())


@dataclass
class HybridLookup:
    hit_tokens: int
    """Leading tokens whose KV is cached for every layer (full objects up to here and the window here)."""
    chain_tokens: int
    """Leading tokens covered by full objects alone (a hit needs a window object too)."""
    windows: list[int] = field(default_factory=list)
    """Chunk boundaries up to ``chain_tokens`` that have a window object, ascending."""
    source: str = "controller"


@dataclass
class HybridStoreResult(StoreResult):
    windows: int = 0
    """Window objects stored (not counting ones already present)."""
    boundaries: list[int] = field(default_factory=list)
    """The boundaries that have a window object after this store."""


class HybridStream:
    """A retrieved hybrid prefix, shaped like :class:`~kdn.client.LayerStream` for layer loaders: ``num_tokens``,
    ``bytes``, ``groups()`` (one layer each, the model's numbering) and ``decode_group(start, end, out)``.

    Full layers come from the full objects' stream; a sliding layer holds zeros before ``num_tokens - W`` and the
    window object's KV after it (the model's sliding mask never reads the zeros)."""

    writes_device = False

    def __init__(self, client: HybridClient, full, window, num_tokens: int) -> None:
        self.client = client
        self.layout = client.layout
        self.full = full
        self.window = window
        self.num_tokens = num_tokens
        self.device = getattr(full, "device", "cpu")
        self.bytes = full.bytes + window.numel() * window.element_size()
        self.arrival = getattr(full, "arrival", None)
        self._full_groups = list(full.groups())
        self._decoded: dict[tuple[int, int], object] = {}

    def groups(self) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(self.layout.num_layers)]

    def empty(self):
        import torch

        return torch.empty(self.layout.shape(self.num_tokens), dtype=torch_dtype(self.layout.dtype),
                           device=self.device)

    def _full_layer(self, sub: int):
        group = next((g for g in self._full_groups if g[0] <= sub < g[1]), None)
        if group is None:
            raise InvalidRequest(f"full layer {sub} is in no layer group of the stored objects")
        kv = self._decoded.get(group)
        if kv is None:
            kv = self._decoded[group] = self.full.decode_group(*group)
        if sub == group[1] - 1:  # layers are asked for in order: the group is done
            self._decoded.pop(group, None)
        return kv[sub - group[0]]

    def decode_group(self, layer_start: int, layer_end: int, out=None):
        """Layers ``[layer_start, layer_end)`` of the prefix into ``out`` (``[layers, 2, tokens, heads, dim]``)."""
        import torch

        if out is None:
            out = torch.empty(self.layout.shape(self.num_tokens, layer_end - layer_start),
                              dtype=torch_dtype(self.layout.dtype), device=self.device)
        client = self.client
        w = self.window.shape[2]
        for k, layer in enumerate(range(layer_start, layer_end)):
            if layer in client.full_index:
                out[k].copy_(self._full_layer(client.full_index[layer]))
            else:
                out[k, :, :self.num_tokens - w].zero_()
                out[k, :, self.num_tokens - w:].copy_(self.window[client.sliding_index[layer]])
        return out

    def close(self) -> None:
        self._decoded.clear()
        self.full.close()


class _Empty:
    """A miss, shaped like a stream."""

    num_tokens = 0
    bytes = 0
    arrival = None
    writes_device = False

    def groups(self) -> list[tuple[int, int]]:
        return []

    def close(self) -> None:
        pass


class HybridClient:
    """Lookup, retrieve and store prefixes of a hybrid ``layout`` (see the module docstring). Thread-safe; call
    ``close()``. Remote failures never raise: they become misses, or show in the store result."""

    #: :meth:`retrieve_layers` takes ``layer_major`` (passed to the full objects' fetch).
    streams_layers = True

    def __init__(self, layout: KVLayout, config: ClientConfig | None = None, **overrides) -> None:
        if layout.part:
            raise InvalidRequest("HybridClient takes a whole model's layout, not a part layout")
        self.layout = layout
        self.hybrid = layout.is_hybrid
        self.window = layout.sliding_window
        config = copy.copy(config or ClientConfig())
        full_layers, sliding_layers = layout.layers_of("full"), layout.layers_of("sliding")
        self.full_index = {layer: i for i, layer in enumerate(full_layers)}
        self.sliding_index = {layer: i for i, layer in enumerate(sliding_layers)}
        if self.hybrid and not full_layers:
            raise InvalidRequest("a layout whose layers all slide is not supported (no full-attention layer)")
        extra = {"store_partial": False} if self.hybrid else {}
        self.full = KDNClient(layout.part_layout("full"), copy.copy(config), **{**overrides, **extra})
        self.sliding: KDNClient | None = None
        if self.hybrid:
            try:
                self.sliding = KDNClient(layout.part_layout("sliding"), copy.copy(config), **overrides)
            except BaseException:
                self.full.close()
                raise
        self.config = self.full.config
        self._full_rows = list(full_layers)
        self._sliding_rows = list(sliding_layers)
        self._stores = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdn-hybrid-store")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish queued stores (up to the deadline), then release both part clients."""
        if self._closed:
            return
        self.flush(self.config.timeout_s)
        self._closed = True
        self._stores.shutdown(wait=True)
        self.full.close()
        if self.sliding is not None:
            self.sliding.close()

    def __enter__(self) -> HybridClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued store has finished; False on timeout."""
        from concurrent.futures import wait

        with self._lock:
            pending = list(self._pending)
        done, not_done = wait(pending, timeout=timeout)
        return not not_done and self.full.flush(timeout)

    def refresh_nodes(self):
        """The live nodes (see :meth:`KDNClient.refresh_nodes`)."""
        nodes = self.full.refresh_nodes()
        if self.sliding is not None:
            self.sliding.refresh_nodes()
        return nodes

    def _window_keys(self, keyed: Sequence[tuple[ChunkSpan, ChunkKey]]) -> list[ChunkKey]:
        assert self.sliding is not None
        return [window_key(key, self.sliding.fingerprint, self.window) for _, key in keyed]

    # -- lookup --------------------------------------------------------------------------------------------------
    def lookup(self, tokens) -> HybridLookup:
        """The longest prefix of ``tokens`` cached for every layer. Never raises for remote failures."""
        chain = self.full.lookup(tokens)
        if not self.hybrid:
            return HybridLookup(chain.hit_tokens, chain.hit_tokens, [], chain.source)
        keyed = [(c.span, c.key) for c in chain.chunks]
        if not keyed:
            return HybridLookup(0, 0, [], chain.source)
        try:
            found = self.sliding.locate(self._window_keys(keyed), probe=True)
        except AuthError:
            raise
        except KDNError as exc:
            log.warning("window lookup failed (%s): a miss", exc)
            return HybridLookup(0, chain.hit_tokens, [], "none")
        windows = [span.end for (span, _), nodes in zip(keyed, found) if nodes]
        return HybridLookup(windows[-1] if windows else 0, chain.hit_tokens, windows, chain.source)

    # -- retrieve ------------------------------------------------------------------------------------------------
    def retrieve_layers(self, tokens, *, device="cpu", max_tokens: int | None = None, layer_major: bool = False):
        """The longest prefix cached for every layer, as a :class:`HybridStream` (a stream with ``num_tokens`` 0
        on a miss). A window object or a full object that cannot be fetched intact makes that boundary a miss;
        the next shorter boundary with a window is tried once. Never raises for remote failures."""
        toks = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if max_tokens is not None:
            toks = toks[:max(0, max_tokens)]
        if not self.hybrid:
            return self.full.retrieve_layers(toks, device=device, max_tokens=max_tokens, layer_major=layer_major)
        look = self.lookup(toks)
        candidates = list(reversed(look.windows))[:2]
        for b in candidates:
            span, key = self.full.keys(toks[:b])[-1]
            window = self.sliding.get_chunks(self._window_keys([(span, key)]))[0]
            if window is None or window.shape[2] != min(self.window, b):
                log.warning("window object at %d tokens missing or malformed: a miss there", b)
                continue
            stream = self.full.retrieve_layers(toks[:b], device=device, max_tokens=b, layer_major=layer_major)
            if stream.num_tokens == b:
                return HybridStream(self, stream, window, b)
            log.warning("full-layer chunks up to %d tokens not all delivered (%d): a miss there", b,
                        stream.num_tokens)
            stream.close()
        return _Empty()

    def retrieve(self, tokens, *, device="cpu", max_tokens: int | None = None):
        """``(num_tokens, kv)``: the whole prefix as one tensor ``[layers, 2, tokens, heads, dim]`` (sliding
        layers zero before the window), or ``(0, None)`` on a miss."""
        stream = self.retrieve_layers(tokens, device=device, max_tokens=max_tokens)
        try:
            if not stream.num_tokens:
                return 0, None
            return stream.num_tokens, stream.decode_group(0, self.layout.num_layers)
        finally:
            stream.close()

    # -- store ---------------------------------------------------------------------------------------------------
    def store(self, tokens, kv, *, copy: bool = True, sliding_from: int = 0) -> Future:
        """Queue ``kv`` (``[layers, 2, len(tokens), heads, dim]``) of ``tokens``: full objects for every whole chunk,
        window objects at the last chunk boundary and at the divergence boundary (module docstring).

        Only what is stored is copied, before this returns (``copy`` is accepted for :class:`KDNClient` parity);
        the divergence boundary is found by one existence probe to the controller here. ``kv``'s sliding layers
        must hold real KV in the ``W`` tokens before those boundaries, which is so for the cache of any prefill
        that loaded a hit from this client (its zeros lie before the hit's window). ``sliding_from``: the first
        token whose sliding-layer KV in ``kv`` is real (a paged cache that freed older blocks, e.g. vLLM's hybrid
        allocator); a boundary whose window starts before it gets no window object. Returns a future of
        :class:`HybridStoreResult`; raises :class:`InvalidRequest` for a tensor that does not match the layout."""
        if not self.hybrid:
            return self.full.store(tokens, kv, copy=copy)
        if self._closed:
            raise InvalidRequest("client is closed")
        check_kv(kv, self.layout)
        toks = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if kv.shape[2] != len(toks):
            raise InvalidRequest(f"KV holds {kv.shape[2]} tokens but {len(toks)} tokens were given")
        future: Future = Future()
        keyed = self.full.keys(toks)
        if not keyed:
            future.set_result(HybridStoreResult())
            return future
        with self._lock:
            if len(self._pending) >= max(1, self.config.store_queue):
                future.set_result(HybridStoreResult(dropped=True, error="store queue full"))
                return future
        try:
            present = self.full.locate([k for _, k in keyed], probe=True)
        except KDNError as exc:
            log.warning("existence probe failed (%s): storing without a divergence window", exc)
            present = [[] for _ in keyed]
        run = next((i for i, nodes in enumerate(present) if not nodes), len(keyed))
        ends = sorted({len(keyed) - 1} | ({run - 1} if 0 < run < len(keyed) else set()))
        ends = [i for i in ends if max(0, keyed[i][0].end - self.window) >= sliding_from]
        import torch

        full_kv = kv.index_select(0, torch.tensor(self._full_rows, device=kv.device))
        sliding_rows = torch.tensor(self._sliding_rows, device=kv.device)
        windows = []
        for i in ends:
            b = keyed[i][0].end
            start = max(0, b - self.window)
            windows.append((b, keyed[i], kv[:, :, start:b].index_select(0, sliding_rows), start))
        job = self._stores.submit(self._store_now, keyed, full_kv, windows, run)
        with self._lock:
            self._pending.add(job)

        def done(f: Future) -> None:
            with self._lock:
                self._pending.discard(f)
            exc = f.exception()
            future.set_result(f.result() if exc is None else HybridStoreResult(error=str(exc)))

        job.add_done_callback(done)
        return future

    def _store_now(self, keyed, full_kv, windows, run: int) -> HybridStoreResult:
        chunks = [(key, full_kv[:, :, span.start:span.end], span.start) for span, key in keyed]
        ok = self.full.put_chunks(chunks)
        result = HybridStoreResult(stored=sum(o for o in ok[run:]), skipped=min(run, sum(ok[:run])),
                                   failed=ok.count(False))
        # Windows last: a lookup that sees a window also sees the full objects before it.
        index_of = {span.end: i for i, (span, _) in enumerate(keyed)}
        wanted = [(b, self._window_keys([kp])[0], w, s) for b, kp, w, s in windows if all(ok[:index_of[b] + 1])]
        if not wanted:
            if windows:
                result.error = "full-layer chunks failed: no window stored"
            return result
        present = self.sliding.locate([wkey for _, wkey, _, _ in wanted], probe=True)
        stored = self.sliding.put_chunks([(wkey, w, s) for _, wkey, w, s in wanted])
        result.windows = sum(1 for p, s in zip(present, stored) if s and not p)
        result.boundaries = [b for (b, _, _, _), s in zip(wanted, stored) if s]
        if not all(stored):
            result.failed += stored.count(False)
            result.error = result.error or "a window object failed to store"
        return result
