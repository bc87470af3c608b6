"""GPU tier: chunk objects in one pre-allocated device pool, placed by the same two-level allocator.

Hits are served on the device without a host round trip through :meth:`GPUTier.lease_many` /
:meth:`GPUTier.get_tensor`: a lease pins the object and ``Lease.tensor`` is a ``torch.uint8`` view of its bytes in
the pool (a GPU decoder reads it in place). ``put_many`` also accepts device tensors (a device-to-device copy).
Host bytes travel through a per-thread page-locked staging buffer (grown to the largest object, up to 256 MiB;
larger objects go through pageable memory): a parallel host copy plus a DMA beat a pageable copy (~15 GB/s on an
H100 host). A put from a page-locked tensor (e.g. a pinned-tier lease) is a single DMA. The generic
``get_many`` returns host copies.
Eviction, leases, ``on_evict`` copies and thread safety follow :class:`~kdn.node.tiers.pinned.PoolTier`.

Copies run on a dedicated CUDA stream per tier and are synchronized before a put returns or a get hands its
bytes back, so a published object is always complete. Constructing the tier without CUDA raises ``ConfigError``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdn.errors import ConfigError
from kdn.node.tiers.allocator import DEFAULT_MIN_PAGES
from kdn.node.tiers.pinned import Lease, PinnedTierConfig, PoolTier
from kdn.wire.buffers import copy_bytes, host_tensor

__all__ = ["GPUTier", "GPUTierConfig"]

log = logging.getLogger(__name__)

_MAX_STAGED = 256 << 20  # larger objects are copied from/to pageable memory directly

@dataclass
class GPUTierConfig(PinnedTierConfig):
    capacity: int = 8 << 30
    """Bytes of device memory taken for the pool at start."""
    device: str = "cuda"
    """Torch device of the pool, e.g. ``cuda:1``."""


class GPUTier(PoolTier):
    """Chunk objects in one device memory pool."""

    kind = "gpu"
    config_class = GPUTierConfig

    def __init__(self, capacity: int, *, device: str = "cuda", granularity_bytes: int = 4096,
                 chunk_bytes: Sequence[Any] = (), page_bytes: int = 0, min_pages: int = DEFAULT_MIN_PAGES) -> None:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("gpu tier: CUDA is not available on this machine")
        config = GPUTierConfig(capacity, granularity_bytes, list(chunk_bytes), page_bytes, min_pages, device)
        config.validate()
        super().__init__(config.allocator())
        self.device = torch.device(device)
        self._pool = torch.empty(self.allocator.arena_bytes, dtype=torch.uint8, device=self.device)
        self._stream = torch.cuda.Stream(self.device)
        self._local = threading.local()  # per-thread page-locked staging buffers
        log.info("gpu tier: %d bytes on %s, pages of %d bytes, slab slots %s", capacity, self.device,
                 self.allocator.page_bytes, self.allocator.slot_sizes)

    @classmethod
    def from_config(cls, config: GPUTierConfig, data_dir: str) -> GPUTier:
        return cls(config.capacity, device=config.device, granularity_bytes=config.granularity_bytes,
                   chunk_bytes=config.chunk_bytes, page_bytes=config.page_bytes, min_pages=config.min_pages)

    def get_tensor(self, key: str) -> Lease | None:
        """A lease whose ``tensor`` is the object's bytes on the device (alias of :meth:`lease`)."""
        return self.lease(key)

    def _staging(self, nbytes: int) -> Any:
        """This thread's page-locked staging buffer of at least ``nbytes`` (grown in powers of two)."""
        import torch

        stage = getattr(self._local, "stage", None)
        if stage is None or stage.numel() < nbytes:
            size = 1 << max(20, (nbytes - 1).bit_length())
            stage = self._local.stage = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return stage[:nbytes]

    def _write(self, offset: int, data: Any) -> None:
        import torch

        if hasattr(data, "data_ptr"):  # a torch tensor, host or device
            src = data.reshape(-1).view(torch.uint8)
        else:
            src = host_tensor(data)
            if src.numel() <= _MAX_STAGED:
                copy_bytes(self._staging(src.numel()), src)
                src = self._staging(src.numel())
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # a device source may still be written
        with torch.cuda.stream(self._stream):
            self._pool[offset:offset + src.numel()].copy_(src, non_blocking=True)
        self._stream.synchronize()

    def _read(self, offset: int, nbytes: int) -> memoryview:
        import numpy as np
        import torch

        out = torch.from_numpy(np.empty(nbytes, dtype=np.uint8))  # huge pages where numpy asks for them
        staged = nbytes <= _MAX_STAGED
        with torch.cuda.stream(self._stream):
            (self._staging(nbytes) if staged else out).copy_(self._pool[offset:offset + nbytes], non_blocking=True)
        self._stream.synchronize()
        if staged:
            copy_bytes(out, self._staging(nbytes))
        return memoryview(out.numpy())

    def _tensor(self, offset: int, nbytes: int) -> Any:
        return self._pool[offset:offset + nbytes]

    def _view(self, offset: int, nbytes: int) -> memoryview:
        raise ConfigError("gpu tier objects live in device memory: use Lease.tensor, not Lease.view()")

    def _release_memory(self) -> None:
        self._pool = None
