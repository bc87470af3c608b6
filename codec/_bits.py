"""Packing of variable-width raw bit fields, one byte-aligned run per stream (LSB-first)."""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "run_bytes"]


def run_bytes(widths: np.ndarray) -> np.ndarray:
    """Bytes of each stream's run for ``widths[s, i]`` bits per value."""
    return (widths.sum(axis=1, dtype=np.int64) + 7) // 8


def _bit_positions(widths: np.ndarray) -> tuple[np.ndarray, int]:
    nbytes = run_bytes(widths)
    base = np.zeros(widths.shape[0], dtype=np.int64)
    base[1:] = np.cumsum(nbytes)[:-1] * 8
    start = base[:, None] + np.cumsum(widths, axis=1, dtype=np.int64) - widths
    return start, int(nbytes.sum())


def pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Write the low ``widths[s, i]`` bits of ``values[s, i]``; bit ``k`` of value ``i`` of stream ``s`` goes to
    bit position ``base[s] + sum(widths[s, :i]) + k`` (byte ``p // 8``, bit ``p % 8``)."""
    start, total = _bit_positions(widths)
    bits = np.zeros(total * 8, dtype=np.uint8)
    for k in range(int(widths.max(initial=0))):
        m = widths > k
        bits[start[m] + k] = (values[m] >> k) & 1
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits` (``data`` must be exactly the packed length)."""
    start, total = _bit_positions(widths)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=total), bitorder="little")
    out = np.zeros(widths.shape, dtype=np.int64)
    for k in range(int(widths.max(initial=0))):
        m = widths > k
        out[m] |= bits[start[m] + k].astype(np.int64) << k
    return out
