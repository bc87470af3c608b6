"""Layer-pipelined loading: a background thread decodes (and copies to the GPU) the cached prefix layer group by
layer group while the model computes the earlier layers.

A *layer source* is anything shaped like :class:`kdn.client.LayerStream`: ``num_tokens``, ``bytes``,
``groups() -> [(layer_start, layer_end)]`` and ``decode_group(layer_start, layer_end, out=tensor)`` which fills
``out`` (``[layer_end - layer_start, 2, num_tokens, kv_heads, head_dim]``). A source whose class sets
``writes_device = True`` (or any source when the loader is built with ``direct=True``, e.g. a GPU codec decoder)
is handed a GPU ``out`` directly, inside the loader's copy stream, and may issue non-blocking work there; other
sources decode into a pinned host staging buffer that the loader then copies to the GPU asynchronously.

A direct source whose class also sets ``enqueue_only = True`` promises that ``decode_group`` only *enqueues*
asynchronous device work on the current stream (copies from pinned or CUDA-registered host memory, kernels) and
never waits. The loader then issues every group at ``start()``, in the caller's thread, with one event per group:
the model's layer ``i`` waits for its copies on the GPU (``wait_event``) and nothing waits on the host, so there
is no loader thread handing layers over through the GIL.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from connectors.hf.cache import PrefixLoadError
from kdn import KVLayout

__all__ = ["LayerLoader", "LoadTrace"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadTrace:
    """Per-layer timestamps (``time.perf_counter()`` seconds) of one pipelined load."""

    start: float = 0.0
    """When the loader thread started."""
    ready: list[float] = field(default_factory=list)
    """When each layer's KV was decoded (and, on a GPU, its copy issued)."""
    wanted: list[float] = field(default_factory=list)
    """When the model first asked for each layer (its attention is about to run)."""
    got: list[float] = field(default_factory=list)
    """When the model received each layer (``got - wanted`` is time the compute waited for the load)."""

    @property
    def wait_s(self) -> float:
        """Total time the model was blocked on loading."""
        return sum(max(0.0, g - w) for g, w in zip(self.got, self.wanted) if g and w)

    @property
    def overlapped(self) -> bool:
        """True when compute on the first layer began before the last layer was ready."""
        return bool(self.wanted and self.ready and self.wanted[0] and self.wanted[0] < self.ready[-1])

    def summary(self) -> dict:
        base = self.start
        first = self.wanted[0] - base if self.wanted and self.wanted[0] else None
        return {"first_layer_wanted_ms": None if first is None else 1e3 * first,
                "last_layer_ready_ms": 1e3 * (self.ready[-1] - base) if self.ready else None,
                "compute_wait_ms": 1e3 * self.wait_s, "overlapped": self.overlapped}


class _Staging:
    """Rings of pinned host buffers, reused across loads (pinned allocation is slow); one ring per live loader."""

    SLOTS = 3
    _free: list[list] = []
    _lock = threading.Lock()

    @classmethod
    def acquire(cls, nbytes: int) -> list[list]:
        with cls._lock:
            for i, ring in enumerate(cls._free):
                if ring[0][0].numel() >= nbytes:
                    return cls._free.pop(i)  # by position: list.remove would compare tensors elementwise
        return [[torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None] for _ in range(cls.SLOTS)]

    @classmethod
    def release(cls, ring: list[list]) -> None:
        for slot in ring:
            if slot[1] is not None:
                slot[1].synchronize()
                slot[1] = None
        with cls._lock:
            cls._free.append(ring)
            cls._free.sort(key=lambda r: r[0][0].numel())
            del cls._free[:-2]  # keep the two largest


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device, shared by every loader. (``torch.cuda.Stream()`` hands out pool streams in
    turn, and the caching allocator reuses a freed block only on its own stream: a new stream per load left up to
    32 prefixes' worth of GPU memory cached and forced allocator flushes, with device syncs, mid-load.)"""
    key = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    stream = _streams.get(key)
    if stream is None:
        stream = _streams.setdefault(key, torch.cuda.Stream(key))
    return stream


class LayerLoader:
    """Feeds one cached prefix to a :class:`~connectors.hf.cache.KDNPrefixCache`, layer by layer.

    ``start()`` launches the thread; ``fetch(i)`` (the cache's callback) blocks until layer ``i`` is ready and
    returns it ``[2, tokens, heads, dim]`` on ``device``; ``close()`` stops the thread (idempotent). At most
    ``lookahead`` layer groups are decoded ahead of the model, bounding staging memory. Not reusable.
    """

    def __init__(self, source, layout: KVLayout, *, device: str | torch.device = "cpu", lookahead: int = 4,
                 direct: bool | None = None) -> None:
        self.source = source
        self.direct = getattr(source, "writes_device", False) if direct is None else direct
        self.layout = layout
        self.device = torch.device(device)
        self.num_tokens = source.num_tokens
        self.groups = list(source.groups())
        n = layout.num_layers
        self.trace = LoadTrace(ready=[0.0] * n, wanted=[0.0] * n, got=[0.0] * n)
        self._kv: list[torch.Tensor | None] = [None] * n
        self._events: list = [None] * n
        self._ready = [threading.Event() for _ in range(n)]
        self._credits = threading.Semaphore(max(1, lookahead))
        self._group_of = {layer: g for g, (s, e) in enumerate(self.groups) for layer in range(s, e)}
        self._taken: set[int] = set()
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kdn-hf-loader", daemon=True)
        self._cuda = self.device.type == "cuda"
        self._copy_stream = _copy_stream(self.device) if self._cuda else None
        self._ring: list[list] | None = None
        covered = sorted(self._group_of)
        if covered != list(range(n)):
            raise PrefixLoadError(f"layer groups {self.groups} do not cover {n} layers")

    def start(self) -> LayerLoader:
        if self._cuda and self.direct and getattr(self.source, "enqueue_only", False):
            self._enqueue_all()
        else:
            self._thread.start()
        return self

    def _enqueue_all(self) -> None:
        """Issue every group's copies now (``enqueue_only`` sources): events order them before their use."""
        self.trace.start = time.perf_counter()
        try:
            for i, (start, end) in enumerate(self.groups):
                self._publish(start, end, *self._load(i, start, end))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which falls back to recompute
            self._error = exc
            for ev in self._ready:
                ev.set()

    def _publish(self, start: int, end: int, kv: torch.Tensor, event) -> None:
        now = time.perf_counter()
        for layer in range(start, end):
            self._kv[layer] = kv[layer - start]
            self._events[layer] = event
            self.trace.ready[layer] = now
            self._ready[layer].set()

    def close(self) -> None:
        self._stop = True
        self._credits.release()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> LayerLoader:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- consumer side (the model's thread) ----------------------------------------------------------------------
    def fetch(self, layer: int) -> torch.Tensor:
        """Block until ``layer``'s prefix KV is ready; return it as ``[2, tokens, heads, dim]`` on the device."""
        self.trace.wanted[layer] = time.perf_counter()
        group = self._group_of[layer]
        if group not in self._taken:
            self._taken.add(group)
            self._credits.release()
        self._ready[layer].wait()
        if self._error is not None:
            raise PrefixLoadError(f"loading layer {layer} of the cached prefix failed: {self._error}") from self._error
        kv, self._kv[layer] = self._kv[layer], None
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self._events[layer])
            kv.record_stream(stream)
        self.trace.got[layer] = time.perf_counter()
        return kv

    # -- loader thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        self.trace.start = time.perf_counter()
        try:
            for i, (start, end) in enumerate(self.groups):
                self._credits.acquire()  # at most `lookahead` groups ahead of the model
                if self._stop:
                    return
                self._publish(start, end, *self._load(i, start, end))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which falls back to recompute
            self._error = exc
        finally:
            if self._ring is not None:
                _Staging.release(self._ring)
                self._ring = None
            for ev in self._ready:
                if not ev.is_set():
                    if self._error is None:
                        self._error = PrefixLoadError("loader stopped")
                    ev.set()

    def _shape(self, layers: int) -> tuple[int, ...]:
        return self.layout.shape(self.num_tokens, layers)

    def _load(self, index: int, start: int, end: int):
        dtype = _DTYPES[self.layout.dtype]
        shape = self._shape(end - start)
        if not self._cuda:
            out = torch.empty(shape, dtype=dtype, device=self.device)
            self.source.decode_group(start, end, out=out)
            return out, None
        if self.direct:
            with torch.cuda.stream(self._copy_stream):
                out = torch.empty(shape, dtype=dtype, device=self.device)
                self.source.decode_group(start, end, out=out)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            return out, event
        if self._ring is None:
            self._ring = _Staging.acquire(self._group_bytes(max(e - s for s, e in self.groups), dtype))
        slot = self._ring[index % len(self._ring)]
        if slot[1] is not None:
            slot[1].synchronize()  # the copy that last read this buffer has finished
        staging = slot[0][:self._group_bytes(end - start, dtype)].view(dtype).view(shape)
        self.source.decode_group(start, end, out=staging)
        with torch.cuda.stream(self._copy_stream):
            out = torch.empty(shape, dtype=dtype, device=self.device)
            out.copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        slot[1] = event
        return out, event

    def _group_bytes(self, layers: int, dtype: torch.dtype) -> int:
        return int(torch.Size(self._shape(layers)).numel()) * torch.empty((), dtype=dtype).element_size()
