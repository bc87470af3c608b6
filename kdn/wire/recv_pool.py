"""Reused receive buffers for the bulk channel: objects land in memory that is already faulted in (and pinned when
the destination is a GPU), not in a fresh allocation per object.

A fresh buffer per object costs its first-touch page faults on every receive (``kdn bench transfer``'s
``raw-fresh`` row: about a third of a reused buffer's rate at 64 MiB). The pool keeps buffers after use, by size
class (sizes rounded up to ``GRANULE``), up to ``capacity`` bytes in all; a request it cannot serve from a free
buffer or from the remaining capacity gets a transient buffer (counted, never blocking). Pinned buffers
(``torch`` page-locked host memory) make host-to-GPU copies run at DMA rate and asynchronously.

Buffers are handed out as :class:`Lease` objects; their memory is reused only after ``release()``, so a caller
releases a lease only when nothing reads the bytes any more (GPU copies from it included: synchronize first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ReceivePool", "Lease", "GRANULE"]

GRANULE = 1 << 20


@dataclass(eq=False)
class Lease:
    """``view``: exactly the requested bytes, writable. ``pooled``: False for a transient buffer."""

    view: memoryview
    size_class: int
    pooled: bool
    _owner: Any = field(repr=False)  # keeps the underlying buffer alive while the lease is out
    _released: bool = field(default=False, repr=False)


def _round(size: int) -> int:
    return max(GRANULE, -(-size // GRANULE) * GRANULE)


class ReceivePool:
    """Thread-safe pool of receive buffers, up to ``capacity`` bytes; ``pinned``: page-locked (needs CUDA)."""

    def __init__(self, capacity: int, *, pinned: bool = False) -> None:
        if capacity < 0:
            raise ValueError(f"pool capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.pinned = bool(pinned)
        self._lock = threading.Lock()
        self._free: dict[int, list[Any]] = {}
        self.allocated = 0
        """Bytes of pooled buffers (free or leased)."""
        self.leased = 0
        self.reused = 0
        self.transient = 0
        """Leases served from a free buffer / by a transient allocation (counters)."""

    def _new(self, nbytes: int) -> tuple[Any, memoryview]:
        if self.pinned:
            import torch

            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            array = buf.numpy()
        else:
            import numpy as np

            array = buf = np.empty(nbytes, dtype=np.uint8)
        array.fill(0)  # fault every page in now, not during the receive
        return buf, memoryview(array)

    def lease(self, size: int) -> Lease:
        """A buffer of ``size`` bytes: a free pooled one of its size class, a new pooled one while capacity lasts,
        else a transient one."""
        size_class = _round(size)
        with self._lock:
            free = self._free.get(size_class)
            if free:
                owner, view = free.pop()
                self.reused += 1
                self.leased += size_class
                return Lease(view[:size], size_class, True, (owner, view))
            pooled = self.allocated + size_class <= self.capacity
            if pooled:
                self.allocated += size_class
                self.leased += size_class
            else:
                self.transient += 1
        if not pooled:
            buf = bytearray(size)
            return Lease(memoryview(buf), size_class, False, buf)
        try:
            owner, view = self._new(size_class)
        except BaseException:
            with self._lock:
                self.allocated -= size_class
                self.leased -= size_class
            raise
        return Lease(view[:size], size_class, True, (owner, view))

    def release(self, lease: Lease) -> None:
        """Return a lease's buffer for reuse (idempotent)."""
        if lease._released:
            return
        lease._released = True
        if not lease.pooled:
            return
        with self._lock:
            self.leased -= lease.size_class
            self._free.setdefault(lease.size_class, []).append(lease._owner)

    def clear(self) -> None:
        """Free the buffers not leased now (leased ones come back to the pool when released)."""
        with self._lock:
            self.allocated -= sum(k * len(v) for k, v in self._free.items())
            self._free.clear()
