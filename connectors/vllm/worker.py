"""Worker-side half of the vLLM connector: layer-wise loads into, and stores out of, the paged KV cache.

No vLLM import: the connector hands in the cache tensors (one per attention layer, in layer order), their
:class:`~connectors.vllm.paged.PagedKVLayout`, and each step's :class:`~connectors.vllm.plan.LoadSpec` /
:class:`~connectors.vllm.plan.SaveSpec` lists.

Loads: :meth:`KVWorker.start_load` fetches and verifies every chunk (``KDNClient.retrieve_layers``), then a
background thread decodes layer group by layer group and scatters each layer into its blocks while the model
already computes the earlier layers; :meth:`wait_for_layer` blocks only until that layer is written. Blocks that
could not be loaded are reported through :meth:`take_failed_blocks` (vLLM then recomputes them).

Stores: :meth:`save_layer` gathers each saved request's blocks of one layer into a staging tensor right after
that layer's attention ran; :meth:`flush_saves` hands the complete tensor to ``KDNClient.store`` (queued,
encoded and sent on the client's own thread), so the engine step never waits for the network.

Hybrid models (vLLM's hybrid allocator: several KV cache groups, each with its own block table): each layer reads
and writes the blocks of its own group (``layer_groups``); a sliding-window group's blocks before its window are
vLLM's null block, which is never read or written. The client is then a :class:`~kdn.client.hybrid.HybridClient`:
it stores full-attention layers per chunk and sliding layers' last ``W`` tokens at chosen boundaries (only where
those tokens are still in real blocks), and a load writes sliding layers into their window's blocks only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from connectors.vllm.paged import PagedKVLayout, StridedKVLayout
from connectors.vllm.plan import LoadSpec, SaveSpec
from kdn.client import KDNClient
from kdn.client.hybrid import HybridClient

__all__ = ["KVWorker", "NULL_BLOCK_ID"]

log = logging.getLogger(__name__)

#: vLLM's null block (``BlockPool.null_block``: the first block of the free queue, id 0), which stands for a
#: sliding-window group's blocks that fell out of the window.
NULL_BLOCK_ID = 0


def _live_from(block_ids: Sequence[int], end: int) -> int:
    """The first position ``p`` of ``block_ids[:end]`` after which no block is the null block."""
    for p in range(min(end, len(block_ids)) - 1, -1, -1):
        if block_ids[p] == NULL_BLOCK_ID:
            return p + 1
    return 0


def _layer_groups(stream):
    """``(start, stop, kv)`` per layer group of a retrieved stream (a ``LayerStream`` decodes ahead on
    iteration; a ``HybridStream`` decodes on demand), closing it at the end."""
    if hasattr(stream, "__iter__"):
        yield from stream
        return
    try:
        for start, stop in stream.groups():
            yield start, stop, stream.decode_group(start, stop)
    finally:
        stream.close()


class KVWorker:
    """Loads and stores for one worker (one TP rank). Call order per step: ``start_load``, then per layer
    ``wait_for_layer`` and ``save_layer``, then ``flush_saves``. ``close()`` waits for queued stores."""

    def __init__(self, client: KDNClient | HybridClient, caches: Sequence[torch.Tensor],
                 layout: PagedKVLayout | StridedKVLayout, *, layer_groups: Sequence[int] | None = None,
                 wait_timeout_s: float = 120.0, on_event: Callable[[dict], None] | None = None) -> None:
        for cache in caches:
            layout.check(cache)
        if len(caches) != client.layout.num_layers:
            raise ValueError(f"{len(caches)} KV cache tensors for a {client.layout.num_layers}-layer layout")
        self.layer_groups = list(layer_groups) if layer_groups is not None else [0] * len(caches)
        if len(self.layer_groups) != len(caches) or min(self.layer_groups, default=0) < 0:
            raise ValueError(f"layer_groups must give one group index >= 0 per layer ({len(caches)} layers), got "
                             f"{self.layer_groups}")
        self.client = client
        self.caches = list(caches)
        self.layout = layout
        self.block_size = layout.block_size
        self.wait_timeout_s = wait_timeout_s
        self.on_event = on_event or (lambda event: None)
        self._ready = [threading.Event() for _ in self.caches]
        for event in self._ready:
            event.set()
        self._failed: set[int] = set()
        self._finished_bg: set[str] = set()
        self._failed_bg: set[str] = set()
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._background: ThreadPoolExecutor | None = None
        self._saves: list[tuple[SaveSpec, torch.Tensor, list[bool], float]] = []
        self.pending_stores: list = []
        self.device = self.caches[0].device if self.caches else torch.device("cpu")
        self._device_kw = {} if self.device.type == "cpu" else {"device": self.device}

    # -- loads ---------------------------------------------------------------------------------------------------
    def start_load(self, specs: Sequence[LoadSpec]) -> None:
        """Fetch and verify every spec's chunks, then write them layer by layer in the background (a
        :attr:`~connectors.vllm.plan.LoadSpec.background` spec entirely off the step: see
        :meth:`take_finished_loads`)."""
        self._join_loader()
        for spec in specs:
            if spec.background:
                if self._background is None:
                    self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdn-vllm-bg-load")
                self._background.submit(self._load_background, spec)
        specs = [s for s in specs if s.end > s.start and not s.background]
        if not specs:
            return
        for event in self._ready:
            event.clear()
        t0 = time.perf_counter()
        streams = []
        for spec in specs:
            try:
                stream = self.client.retrieve_layers(spec.token_ids[:spec.end], max_tokens=spec.end,
                                                     **self._device_kw)
            except Exception as exc:  # noqa: BLE001 - any failure is a miss for this request
                log.warning("KDN retrieve failed for %s: %s", spec.req_id, exc)
                stream = None
            got = stream.num_tokens // self.block_size * self.block_size if stream is not None else 0
            if got < spec.end:
                self._fail(spec, max(got, spec.start))
            streams.append((spec, stream, got))
        self._loader = threading.Thread(target=self._load_layers, args=(streams, t0), name="kdn-vllm-load",
                                        daemon=True)
        self._loader.start()

    def _blocks(self, spec: LoadSpec | SaveSpec, index: int) -> list[int]:
        """Layer ``index``'s block ids in ``spec`` (its group's)."""
        groups = spec.group_block_ids
        if not groups:
            return spec.block_ids
        group = self.layer_groups[index]
        if group >= len(groups):
            raise ValueError(f"layer {index} is in KV cache group {group}; the plan has {len(groups)} groups")
        return groups[group]

    @staticmethod
    def _live_from(spec: LoadSpec | SaveSpec, block_ids: Sequence[int], end: int) -> int:
        """:func:`_live_from` for several groups; 0 with one group (no block is ever freed early there)."""
        return _live_from(block_ids, end) if spec.group_block_ids else 0

    def _fail(self, spec: LoadSpec, from_token: int) -> None:
        first, end = from_token // self.block_size, spec.end // self.block_size
        with self._lock:
            if not spec.group_block_ids:
                self._failed.update(spec.block_ids[first:end])
            for blocks in spec.group_block_ids:
                self._failed.update(b for b in blocks[first:end] if b != NULL_BLOCK_ID)

    def _load_layers(self, streams: list, t0: float) -> None:
        live = [(spec, stream, got) for spec, stream, got in streams if stream is not None and got > spec.start]
        iters = [_layer_groups(stream) for _, stream, _ in live]
        layer = 0
        try:
            while layer < len(self.caches):
                end = layer + 1
                for (spec, _, got), it in zip(live, iters):
                    start, stop, kv = next(it)
                    if start != layer:
                        raise RuntimeError(f"layer group {start}:{stop} out of order (expected {layer})")
                    for i in range(stop - start):
                        self._scatter(spec, start + i, kv[i], got)
                    end = stop
                if not live:
                    end = len(self.caches)
                for i in range(layer, end):
                    self._ready[i].set()
                layer = end
        except Exception as exc:  # noqa: BLE001 - report, let vLLM recompute
            log.warning("KDN layer load failed at layer %d: %s", layer, exc)
            for spec, _, _got in live:
                self._fail(spec, spec.start)
        finally:
            for event in self._ready:
                event.set()
        seconds = time.perf_counter() - t0
        for spec, stream, got in streams:
            loaded = max(0, got - spec.start)
            self.on_event({"event": "load", "req": spec.req_id, "tokens": loaded, "requested_tokens":
                           spec.end - spec.start, "bytes": stream.bytes if stream is not None and loaded else 0,
                           "chunks": got // self.client.config.chunk_size if stream is not None and loaded else 0,
                           "seconds": round(seconds, 4)})

    def _scatter(self, spec: LoadSpec, index: int, kv: torch.Tensor, got: int) -> None:
        """Write layer ``index``'s tokens ``[spec.start, got)`` of ``kv`` (``[2, tokens, heads, dim]``) into its
        blocks; a sliding group's only into its window's (non-null) blocks."""
        first, last = spec.start // self.block_size, got // self.block_size
        ids = self._blocks(spec, index)
        p = max(first, self._live_from(spec, ids, last))
        if p < last:
            self.layout.scatter(self.caches[index], ids[p:last], kv[:, p * self.block_size:got])

    def _load_background(self, spec: LoadSpec) -> None:
        """One asynchronous load: all of it or a failure (vLLM then recomputes the whole request)."""
        t0 = time.perf_counter()
        stream, got, ok = None, 0, False
        try:
            stream = self.client.retrieve_layers(spec.token_ids[:spec.end], max_tokens=spec.end, **self._device_kw)
            got = stream.num_tokens // self.block_size * self.block_size
            if got >= spec.end > spec.start:
                for start, stop, kv in _layer_groups(stream):
                    for i in range(stop - start):
                        self._scatter(spec, start + i, kv[i], spec.end)
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                ok = True
            else:
                stream.close()
        except Exception as exc:  # noqa: BLE001 - any failure is a miss for this request, recomputed by vLLM
            log.warning("KDN background load of %s failed: %s", spec.req_id, exc)
        if not ok:
            log.warning("KDN background load of %s failed (%d of %d tokens): vLLM recomputes it", spec.req_id,
                        got, spec.end)
        loaded = spec.end - spec.start if ok else 0
        self.on_event({"event": "load", "req": spec.req_id, "tokens": loaded, "requested_tokens":
                       spec.end - spec.start, "bytes": stream.bytes if ok else 0,
                       "chunks": spec.end // self.client.config.chunk_size if ok else 0,
                       "seconds": round(time.perf_counter() - t0, 4), "background": True})
        with self._lock:
            self._finished_bg.add(spec.req_id)
            if not ok:
                self._failed_bg.add(spec.req_id)

    def take_finished_loads(self) -> tuple[set[str], set[str]]:
        """``(finished, failed)``: requests whose background loads ended since the last call (failed ones are in
        both; vLLM recomputes them)."""
        with self._lock:
            done, failed = self._finished_bg, self._failed_bg
            self._finished_bg, self._failed_bg = set(), set()
        return done, failed

    def wait_for_layer(self, index: int) -> None:
        """Block until layer ``index`` of this step's loads is in the paged cache."""
        if not self._ready[index].wait(self.wait_timeout_s):
            log.error("KDN load of layer %d timed out after %.0f s", index, self.wait_timeout_s)

    def _join_loader(self) -> None:
        if self._loader is not None:
            self._loader.join()
            self._loader = None

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose KV could not be loaded since the last call (vLLM recomputes them)."""
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    # -- stores --------------------------------------------------------------------------------------------------
    def begin_saves(self, specs: Sequence[SaveSpec]) -> None:
        """Allocate staging tensors for this step's saves (``[layers, 2, tokens, heads, dim]`` each)."""
        layout = self.client.layout
        dtype = self.caches[0].dtype
        self._saves = [(spec, torch.empty(layout.shape(len(spec.token_ids)), dtype=dtype, device=self.device),
                        [False] * len(self.caches), time.perf_counter()) for spec in specs]

    def save_layer(self, index: int, cache: torch.Tensor | None = None) -> None:
        """Copy layer ``index`` of every saved request out of the paged cache (call after its attention ran)."""
        cache = self.caches[index] if cache is None else cache
        for spec, staging, done, _ in self._saves:
            ids = self._blocks(spec, index)
            p = self._live_from(spec, ids, len(ids))  # a sliding group: only the blocks still in its window
            if p == 0:
                self.layout.gather(cache, ids, out=staging[index])
            elif p < len(ids):
                staging[index, :, p * self.block_size:].copy_(self.layout.gather(cache, ids[p:]))
            done[index] = True

    def flush_saves(self) -> None:
        """Queue this step's complete staging tensors for storage (returns at once)."""
        saves, self._saves = self._saves, []
        if saves and self.device.type == "cuda":  # the gathers ran on the engine's stream; the client reads later
            torch.cuda.current_stream(self.device).synchronize()
        for spec, staging, done, t0 in saves:
            if not all(done):
                log.warning("KDN store of %s skipped: %d of %d layers saved", spec.req_id, sum(done), len(done))
                self._store_event(spec, t0, failed=len(spec.token_ids) // self.client.config.chunk_size,
                                  error="not every layer was saved")
                continue
            kwargs = {}
            if spec.group_block_ids:  # sliding layers hold real KV only from here on (null blocks before)
                live = max(self._live_from(spec, g, len(g)) for g in spec.group_block_ids) * self.block_size
                kwargs = {"sliding_from": live} if live else {}
            try:
                future = self.client.store(spec.token_ids, staging, copy=False, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a store never fails the engine step
                log.warning("KDN store of %s failed: %s", spec.req_id, exc)
                self._store_event(spec, t0, failed=len(spec.token_ids) // self.client.config.chunk_size,
                                  error=str(exc))
                continue
            future.add_done_callback(self._stored_callback(spec, t0))
            self.pending_stores = [f for f in self.pending_stores if not f.done()] + [future]

    def _store_event(self, spec: SaveSpec, t0: float, *, stored: int = 0, skipped: int = 0, failed: int = 0,
                     dropped: bool = False, error: str = "", windows: list[int] | None = None) -> None:
        event = {"event": "store", "req": spec.req_id, "tokens": len(spec.token_ids), "stored": stored,
                 "skipped": skipped, "failed": failed, "dropped": dropped,
                 "seconds": round(time.perf_counter() - t0, 4)}
        if windows is not None:  # a hybrid store: the boundaries that have a sliding-layer window object
            event["windows"] = windows
        if error:
            event["error"] = error
        self.on_event(event)

    def _stored_callback(self, spec: SaveSpec, t0: float):
        def done(future) -> None:
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a failed store is counted, never raised into the engine
                log.warning("KDN store of %s failed: %s", spec.req_id, exc)
                self._store_event(spec, t0, failed=len(spec.token_ids) // self.client.config.chunk_size,
                                  error=str(exc))
                return
            failed = result.failed
            if result.error and not (result.dropped or result.stored or result.skipped or failed):
                failed = len(spec.token_ids) // self.client.config.chunk_size
            self._store_event(spec, t0, stored=result.stored, skipped=result.skipped, failed=failed,
                              dropped=result.dropped, error=result.error,
                              windows=getattr(result, "boundaries", None) if self.client.layout.is_hybrid else None)
        return done

    def close(self) -> None:
        self._join_loader()
        if self._background is not None:
            self._background.shutdown(wait=True)
        self.client.close()
