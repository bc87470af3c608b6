"""Shared-memory tier: the node's ``memory`` tier kept in one memfd arena that same-host clients can map.

The arena is an anonymous memory file (``memfd_create``) of ``capacity`` bytes, sealed against shrinking so that a
client's mapping can never fault (SIGBUS) however long it lives, even after the node has died. Objects are placed
by the two-level allocator exactly as in the pinned tier (:class:`~kdn.node.tiers.pinned.PoolTier`): a
:meth:`~kdn.node.tiers.pinned.PoolTier.lease_many` pins an object's bytes, which are then never evicted, overwritten or
reused until released. :mod:`kdn.wire.shm` hands the arena's file descriptor to same-host clients and serves leases.

Pages are allocated by the kernel when first written (the file is sparse), so an idle arena costs no memory.
Needs Linux (``os.memfd_create``); :func:`shared_tier_or_none` returns ``None`` elsewhere.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
from typing import Any

import numpy as np

from kdn.node.tiers.allocator import TwoLevelAllocator
from kdn.node.tiers.base import Buffer
from kdn.node.tiers.pinned import PoolTier
from kdn.wire.buffers import byte_view, host_tensor

__all__ = ["SharedMemoryTier", "shared_tier_or_none"]

#: Payload alignment of chunk objects in the arena.
ALIGN = 4096

log = logging.getLogger(__name__)


class SharedMemoryTier(PoolTier):
    """Chunk objects in a memfd arena (kind ``memory``: it replaces the node's plain memory tier)."""

    kind = "memory"

    def __init__(self, capacity: int, *, granularity_bytes: int = 4096, page_bytes: int = 0,
                 align: int = ALIGN) -> None:
        super().__init__(TwoLevelAllocator(int(capacity), granularity=granularity_bytes, page_bytes=page_bytes))
        self.align = align
        self.arena_id = secrets.token_hex(8)
        self.size = self.allocator.arena_bytes
        self.fd = os.memfd_create(f"kdn-arena-{self.arena_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            try:  # the node never shrinks the arena; the seal makes that a guarantee for clients
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            except OSError as exc:
                log.info("shared memory tier: arena not sealed (%s)", exc)
            self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._mem = memoryview(self._map)
        log.info("shared memory tier: arena %s of %d bytes", self.arena_id, self.size)

    def _pad(self, data: Any) -> int:
        """Place each chunk object so that its payload starts on a page: host-to-GPU copies straight from the
        arena then run from aligned addresses (a header is 1-2.5 KiB, so at most a page is skipped)."""
        if hasattr(data, "data_ptr") or self.align <= 1:
            return 0
        try:
            from kdn.format.chunk import header_length

            return -header_length(byte_view(data)[:28]) % self.align
        except Exception:  # noqa: BLE001 - not a chunk object: no padding
            return 0

    def _write(self, offset: int, data: Any) -> None:
        if hasattr(data, "data_ptr"):  # a torch tensor
            data = data.detach().cpu().contiguous().view(-1).numpy().view(np.uint8)
        view = byte_view(data)
        self._mem[offset:offset + view.nbytes] = view

    def _read(self, offset: int, nbytes: int) -> Buffer:
        out = np.empty(nbytes, dtype=np.uint8)
        memoryview(out)[:] = self._mem[offset:offset + nbytes]
        return memoryview(out)

    def _view(self, offset: int, nbytes: int) -> memoryview:
        return self._mem[offset:offset + nbytes].toreadonly()

    def _tensor(self, offset: int, nbytes: int) -> Any:
        return host_tensor(self._view(offset, nbytes))

    def _release_memory(self) -> None:
        try:
            self._mem.release()
            self._map.close()
        except BufferError:  # a private view is still alive somewhere: the mapping goes with it
            log.debug("shared arena %s still referenced at close", self.arena_id)
        os.close(self.fd)
        self.fd = -1


def shared_tier_or_none(capacity: int) -> SharedMemoryTier | None:
    """A :class:`SharedMemoryTier`, or ``None`` (logged) where memfd arenas are not available."""
    try:
        return SharedMemoryTier(capacity)
    except (AttributeError, OSError, ValueError) as exc:  # no memfd_create / seals, or no memory
        log.warning("shared memory tier unavailable (%s); using a private memory tier", exc)
        return None

