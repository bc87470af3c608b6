"""Bytes-like buffers as every side passes them, and zero-copy views of them (no tier, no socket)."""

from __future__ import annotations

from typing import Any, Union

import numpy as np

__all__ = ["Buffer", "byte_view", "host_tensor", "copy_bytes", "fresh_bytes", "is_fresh"]

#: What tiers, transports and chunk code accept and return: never copied just to change type.
Buffer = Union[bytes, bytearray, memoryview]


def fresh_bytes(size: int) -> memoryview:
    """``size`` writable bytes, not zero-filled: large ones are mapped lazily, so pages are committed only as they
    are written (a receive buffer costs what arrived, and no memset). Whoever holds the view owns the bytes."""
    return memoryview(np.empty(size, dtype=np.uint8).view(_Fresh))


class _Fresh(np.ndarray):
    """Marks the arrays :func:`fresh_bytes` made, so a tier can take them over instead of copying."""


def is_fresh(data: Any) -> bool:
    """Whether ``data`` is a whole buffer from :func:`fresh_bytes` (owned by its holder: a tier may keep it)."""
    return isinstance(data, memoryview) and isinstance(data.obj, _Fresh) and data.nbytes == data.obj.nbytes


def byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of any buffer (a cast, never a copy)."""
    view = memoryview(data)
    return view if view.format in ("B", "b", "c") and view.ndim == 1 else view.cast("B")


class _ReadOnly:
    """Presents a read-only buffer to numpy as writable, so torch can wrap it without a copy or a warning;
    only ever used as the *source* of a copy."""

    def __init__(self, view: memoryview) -> None:
        import numpy as np

        self._keep = np.frombuffer(view, dtype=np.uint8)
        self.__array_interface__ = {"shape": (view.nbytes,), "typestr": "|u1", "version": 3,
                                    "data": (self._keep.__array_interface__["data"][0], False)}


def copy_bytes(dst: Any, src: Any) -> None:
    """``dst[:] = src`` for uint8 CPU tensors: torch's multi-threaded copy where torch has 4+ threads (about 6x
    one memcpy on a 16-core H100 host), else one memcpy (torch's copy was 2-3x slower on a 2-core VM)."""
    import torch

    if torch.get_num_threads() >= 4:
        dst.copy_(src)
    else:
        memoryview(dst.numpy())[:] = memoryview(src.numpy())


def host_tensor(data: Any) -> Any:
    """A uint8 CPU tensor over the bytes of a bytes-like object, without copying (read it, never write it)."""
    import numpy as np
    import torch

    view = byte_view(data)
    if not view.nbytes:
        return torch.empty(0, dtype=torch.uint8)
    array = np.frombuffer(view, dtype=np.uint8) if not view.readonly else np.asarray(_ReadOnly(view))
    return torch.from_numpy(array)
