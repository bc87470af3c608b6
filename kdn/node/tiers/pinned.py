"""Pinned CPU memory tier: chunk objects in one pre-allocated pool placed by the two-level allocator.

The pool is a single ``torch.uint8`` tensor allocated at start, page-locked (``pin_memory=True``) when CUDA is
available so that a leased object can go to a GPU by DMA at full speed; plain pageable memory otherwise (the tier
logs which). :mod:`kdn.node.tiers.allocator` places objects (slab pages for the declared full-chunk sizes, variable
pages for compressed and partial chunks); a put that finds no room evicts least-recently-used objects.

Buffer ownership (the contract of :class:`~kdn.node.tiers.base.Tier`):

- ``get_many`` returns a private copy of each object (a memoryview the caller owns), so later puts and
  evictions cannot touch it.
- :meth:`PoolTier.lease_many` is the zero-copy path: a :class:`Lease` pins the object's slot, which is then never
  evicted, overwritten or reused until ``release()`` (or the ``with`` block ends). Deleting a leased key hides it
  at once; its slot is freed by the last release. ``Lease.tensor`` is a uint8 tensor view on the pool's device
  (hand it to ``.to("cuda", non_blocking=True)``: pinned and contiguous); ``Lease.view()`` a read-only memoryview
  (host pools). Never write through either. ``outstanding_leases`` must be 0 when callers are done (leak check).
- ``on_evict`` receives a private copy, made only when a callback is set.

Thread-safe: one lock guards the index and allocator; bytes are copied outside it (the slot being written or read
is pinned meanwhile). A key being written is invisible until the copy ends; a concurrent put of it reports True.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdn.config import parse_size
from kdn.errors import ConfigError
from kdn.node.tiers.allocator import DEFAULT_MIN_PAGES, PoolEntry, PoolIndex, TwoLevelAllocator
from kdn.node.tiers.base import Buffer, Tier
from kdn.wire.buffers import copy_bytes, host_tensor

__all__ = ["PinnedTier", "PinnedTierConfig", "PoolTier", "Lease", "CHUNK_HEADER_ALLOWANCE"]

log = logging.getLogger(__name__)

#: Added to each declared chunk payload size to get its object size (a chunk header is ~1-2.5 KiB).
CHUNK_HEADER_ALLOWANCE = 4096


@dataclass
class PinnedTierConfig:
    capacity: int = 4 << 30
    """Bytes of the pool, allocated (and page-locked when CUDA is present) at start."""
    granularity_bytes: int = 4096
    """Alignment and rounding unit of every object in the pool."""
    chunk_bytes: list[Any] = field(default_factory=list)
    """Raw KV bytes of one full chunk of each layout the pool mostly holds (``bytes_per_token * chunk_size``,
    e.g. ``[32MiB, 5898240]``); each becomes an exact slab class (a 4 KiB header allowance is added) unless it is
    above ``capacity / min_pages`` (then it is placed in variable pages; docs/tiers.md). Empty:
    every object is placed first-fit in variable pages."""
    page_bytes: int = 0
    """Large-page size; 0 derives it from ``chunk_bytes`` (LCM rule, at least ``min_pages`` pages)."""
    min_pages: int = DEFAULT_MIN_PAGES
    """The derived page is at most ``capacity / min_pages``."""

    def validate(self) -> None:
        try:
            self.chunk_bytes = [parse_size(v) for v in self.chunk_bytes]
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"tier chunk_bytes: {exc}") from None
        if self.capacity <= 0 or self.granularity_bytes <= 0 or self.min_pages <= 0:
            raise ConfigError("tier capacity, granularity_bytes and min_pages must be positive")
        if any(c <= 0 for c in self.chunk_bytes):
            raise ConfigError("tier chunk_bytes must be positive sizes")
        if self.page_bytes and (self.page_bytes % self.granularity_bytes or self.page_bytes > self.capacity):
            raise ConfigError("tier page_bytes must be a multiple of granularity_bytes and at most capacity")

    def allocator(self) -> TwoLevelAllocator:
        sizes = [c + CHUNK_HEADER_ALLOWANCE for c in self.chunk_bytes]
        return TwoLevelAllocator(self.capacity, object_sizes=sizes, page_bytes=self.page_bytes,
                                 granularity=self.granularity_bytes, min_pages=self.min_pages)


class Lease:
    """A pinned, zero-copy reference to one object of a pool tier; valid until :meth:`release`."""

    __slots__ = ("key", "nbytes", "_tier", "_entry")

    def __init__(self, tier: PoolTier, entry: PoolEntry) -> None:
        self.key, self.nbytes = entry.key, entry.size
        self._tier: PoolTier | None = tier
        self._entry = entry

    def _live(self) -> PoolTier:
        if self._tier is None:
            raise RuntimeError(f"lease of {self.key} used after release")
        return self._tier

    @property
    def offset(self) -> int:
        """Where the object's first byte lies in the pool."""
        return self._entry.offset + self._entry.pad

    @property
    def tensor(self) -> Any:
        """A 1-D ``torch.uint8`` view of the object's bytes on the pool's device (read only by convention)."""
        return self._live()._tensor(self.offset, self.nbytes)

    def view(self) -> memoryview:
        """A read-only memoryview of the object's bytes (host pools only)."""
        return self._live()._view(self.offset, self.nbytes)

    def release(self) -> None:
        """Unpin the object; idempotent."""
        tier, self._tier = self._tier, None
        if tier is not None:
            tier._unpin(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __len__(self) -> int:
        return self.nbytes


class PoolTier(Tier):
    """A tier over one pre-allocated pool; subclasses supply the memory and the copies."""

    durable = False

    def __init__(self, allocator: TwoLevelAllocator) -> None:
        super().__init__()
        self.allocator = allocator
        self._index = PoolIndex(allocator)
        self._lock = threading.Lock()
        self._closed = False

    # -- memory hooks ------------------------------------------------------------------------------------------
    def _write(self, offset: int, data: Any) -> None:
        raise NotImplementedError

    def _read(self, offset: int, nbytes: int) -> Buffer:
        """A private host copy of the bytes."""
        raise NotImplementedError

    def _tensor(self, offset: int, nbytes: int) -> Any:
        raise NotImplementedError

    def _view(self, offset: int, nbytes: int) -> memoryview:
        raise NotImplementedError

    def _release_memory(self) -> None:
        """Drop the pool's memory (on close, once nothing is pinned)."""

    def _pad(self, data: Any) -> int:
        """Bytes to skip at the start of an object's allocation (e.g. to align its payload); 0 by default."""
        return 0

    # -- Tier --------------------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.allocator.arena_bytes

    @property
    def used_bytes(self) -> int:
        return self._index.used_bytes

    @property
    def outstanding_leases(self) -> int:
        """Objects pinned by leases, reads or writes in flight (0 when every caller is done)."""
        with self._lock:
            return self._index.pinned

    def put_many(self, items: Sequence[tuple[str, Any]]) -> list[bool]:
        return [self._put(key, data) for key, data in items]

    def _put(self, key: str, data: Any) -> bool:
        size = _nbytes(data)
        evicted: list[tuple[str, Buffer]] = []
        keep = self.on_evict is not None

        def on_victim(victim: PoolEntry) -> None:
            if keep:
                evicted.append((victim.key, self._read(victim.offset + victim.pad, victim.size)))

        with self._lock:
            if self._closed:
                return False
            if self._index.lookup(key) is not None or self._index.is_pending(key):
                return True
            entry = self._index.reserve(key, size, on_victim, pad=self._pad(data))
        try:
            if entry is not None:
                try:
                    self._write(entry.offset + entry.pad, data)
                except BaseException:
                    with self._lock:
                        self._index.abort(entry)
                    raise
                with self._lock:
                    self._index.publish(entry)
        finally:
            for victim_key, victim_data in evicted:
                self._evicted(victim_key, victim_data)
        return entry is not None

    def lease_many(self, keys: Sequence[str]) -> list[Lease | None]:
        """Zero-copy leases (``None`` for misses); release each one (or use it as a context manager)."""
        with self._lock:
            if self._closed:
                return [None] * len(keys)
            entries = [self._index.pin(key) for key in keys]
        return [None if e is None else Lease(self, e) for e in entries]

    def lease(self, key: str) -> Lease | None:
        return self.lease_many([key])[0]

    def _unpin(self, entry: PoolEntry) -> None:
        with self._lock:
            self._index.unpin(entry)

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        for lease in self.lease_many(keys):
            if lease is None:
                out.append(None)
                continue
            with lease:
                out.append(self._read(lease.offset, lease.nbytes))
        return out

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [self._index.remove(key) is not None for key in keys]

    def keys(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            return iter(self._index.items())

    def stats(self) -> dict[str, int]:
        """Allocator accounting (see :class:`~kdn.node.tiers.allocator.AllocatorStats`) for metrics."""
        st = self.allocator.stats()
        return {"capacity_bytes": st.arena_bytes, "object_bytes": st.object_bytes, "wasted_bytes": st.wasted_bytes,
                "internal_bytes": st.internal_bytes, "stranded_bytes": st.stranded_bytes,
                "free_bytes": st.free_bytes, "page_bytes": st.page_bytes, "objects": st.objects}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pinned = self._index.pinned
            if not pinned:
                self._release_memory()
        if pinned:
            log.warning("%s tier closed with %d objects still leased; their memory lives until released",
                        self.kind, pinned)


def _advise_huge_pages(address: int, length: int) -> None:
    """Ask Linux for transparent huge pages over a pageable pool (fewer TLB misses: copies ~25 % faster)."""
    import ctypes
    import sys

    huge = 2 << 20
    start, end = -(-address // huge) * huge, (address + length) // huge * huge
    if sys.platform != "linux" or end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE; best effort
    except (OSError, AttributeError):
        pass


def _nbytes(data: Any) -> int:
    if hasattr(data, "nbytes") and not isinstance(data, memoryview):
        return int(data.nbytes)  # a torch tensor or numpy array
    return memoryview(data).nbytes


class PinnedTier(PoolTier):
    """Chunk objects in one host memory pool, page-locked when CUDA is available."""

    kind = "pinned"
    config_class = PinnedTierConfig

    def __init__(self, capacity: int, *, granularity_bytes: int = 4096, chunk_bytes: Sequence[Any] = (),
                 page_bytes: int = 0, min_pages: int = DEFAULT_MIN_PAGES) -> None:
        config = PinnedTierConfig(capacity, granularity_bytes, list(chunk_bytes), page_bytes, min_pages)
        config.validate()
        super().__init__(config.allocator())
        import torch

        self.pinned = bool(torch.cuda.is_available())
        self._pool = torch.empty(self.allocator.arena_bytes, dtype=torch.uint8, pin_memory=self.pinned)
        if not self.pinned:
            _advise_huge_pages(self._pool.data_ptr(), self._pool.numel())
            self._pool.zero_()  # fault the pages in now, not on the first put of each
        self._mem = memoryview(self._pool.numpy())
        log.info("pinned tier: %d bytes in %s memory, pages of %d bytes, slab slots %s", capacity,
                 "page-locked" if self.pinned else "pageable (no CUDA)", self.allocator.page_bytes,
                 self.allocator.slot_sizes)

    @classmethod
    def from_config(cls, config: PinnedTierConfig, data_dir: str) -> PinnedTier:
        return cls(config.capacity, granularity_bytes=config.granularity_bytes, chunk_bytes=config.chunk_bytes,
                   page_bytes=config.page_bytes, min_pages=config.min_pages)

    def _write(self, offset: int, data: Any) -> None:
        dst = self._pool[offset:offset + _nbytes(data)]
        if hasattr(data, "data_ptr"):  # a torch tensor (any device)
            dst.copy_(data.reshape(-1).view(dst.dtype))
        else:
            copy_bytes(dst, host_tensor(data))

    def _read(self, offset: int, nbytes: int) -> memoryview:
        import numpy as np
        import torch

        out = np.empty(nbytes, dtype=np.uint8)  # numpy asks for huge pages: far fewer first-touch faults
        copy_bytes(torch.from_numpy(out), self._pool[offset:offset + nbytes])
        return memoryview(out)

    def _tensor(self, offset: int, nbytes: int) -> Any:
        return self._pool[offset:offset + nbytes]

    def _view(self, offset: int, nbytes: int) -> memoryview:
        return self._mem[offset:offset + nbytes].toreadonly()

    def _release_memory(self) -> None:
        self._mem = memoryview(b"")
        self._pool = None
