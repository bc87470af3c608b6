"""``lossless``: bit-exact KV in ~2/3 of the bytes: byte planes + rANS, no model profile needed.

Every 16-bit value ``v`` (bfloat16 or float16) is split into ``A = (v >> 7) & 0xFF`` (bf16: the exponent) and
``B = (v >> 8 & 0x80) | (v & 0x7F)`` (sign and low mantissa bits). ``A`` is predictable: per channel it is coded
as ``(A - ref[c]) mod 256`` with one rANS table per (layer, K/V) measured on the section itself; ``B`` is close to
uniform and is stored raw. float32 values use their exponent byte as ``A``, and sign + mantissa (3 bytes) raw.

Section layout (little-endian; streams as in :mod:`codec.cachegen`: one per (layer, K/V, group of ``G`` channels),
``T * G`` symbols token-major, 32 interleaved rANS lanes)::

    0   u8   version (1)        1  u8  value bytes (2 or 4)     2  u16  num_layers     4  u32  num_tokens
    8   u32  num_streams S      12 u32 G (channels per stream)
    16  u8[nl * 2 * C]   ref: per (layer, kv, channel) reference byte
    ..  per (layer, kv): u16 k, then k x (u8 symbol, u16 freq) sorted by symbol, freqs summing to 4096;
        zero padding to a multiple of 4
    ..  u32[S] word counts; u32[S * 32] final states
    ..  raw plane: nl*2*T*C bytes of B (16-bit types) or 3 bytes per value (float32: sign|mantissa, little-endian)
    ..  u16 words, streams back to back; the section ends exactly there
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from codec import _rans
from codec.base import Codec
from codec.errors import CorruptStream, InvalidInput
from codec.raw import tensor_bytes, torch_dtype

__all__ = ["LosslessCodec"]

_HEAD = struct.Struct("<BBHIII")
_VERSION = 1
_ENTRY = np.dtype([("sym", "u1"), ("freq", "<u2")])


def _stream_channels(c: int) -> int:
    return c if c <= 256 else max(d for d in range(1, 257) if c % d == 0)


def _to_streams(a: np.ndarray, g: int) -> np.ndarray:
    nl, _, t, c = a.shape
    return np.ascontiguousarray(a.reshape(nl, 2, t, c // g, g).transpose(0, 1, 3, 2, 4)).reshape(-1, t * g)


def _from_streams(a: np.ndarray, nl: int, t: int, c: int, g: int) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(nl, 2, c // g, t, g).transpose(0, 1, 3, 2, 4)).reshape(nl, 2, t, c)


class LosslessCodec(Codec):
    """Bit-exact; about 1.5x smaller than bf16 on real KV (see docs/codec.md)."""

    name = "lossless"
    lossless = True

    def __init__(self, layout, **_ignored) -> None:
        super().__init__(layout)
        self._wide = layout.itemsize == 4

    def _split(self, kv: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        nl, _, t = kv.shape[:3]
        raw = np.frombuffer(tensor_bytes(kv), dtype="<u4" if self._wide else "<u2").astype(np.int64)
        raw = raw.reshape(nl, 2, t, -1)
        if self._wide:
            a = (raw >> 23) & 0xFF
            rest = ((raw >> 8) & 0x800000) | (raw & 0x7FFFFF)
            plane = rest.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            a = (raw >> 7) & 0xFF
            plane = (((raw >> 8) & 0x80) | (raw & 0x7F)).astype(np.uint8).tobytes()
        return a, plane

    def encode(self, kv: torch.Tensor, *, layer_start: int | None = None) -> bytes:
        if kv.dtype != torch_dtype(self.layout.dtype):
            raise InvalidInput(f"KV dtype {kv.dtype} does not match layout dtype {self.layout.dtype}")
        nl, _, t = kv.shape[:3]
        a, plane = self._split(kv)
        c = a.shape[-1]
        g = _stream_channels(c)
        counts = np.bincount((np.arange(nl * 2 * c).reshape(nl, 2, 1, c) * 256 + a).ravel(),
                             minlength=nl * 2 * c * 256).reshape(nl, 2, c, 256)
        ref = counts.argmax(axis=-1)  # per-channel mode of A
        sym = (a - ref[:, :, None, :]) % 256
        hist = np.bincount((np.arange(nl * 2).reshape(nl, 2, 1, 1) * 256 + sym).ravel(),
                           minlength=nl * 2 * 256).reshape(nl * 2, 256)
        freq = np.zeros((nl * 2, 256), dtype=np.uint32)
        table_parts = []
        for i in range(nl * 2):
            present = np.flatnonzero(hist[i])
            if present.size == 0:  # no tokens: any valid table
                present = np.array([0])
            freq[i, present] = _rans.normalize_freqs(hist[i, present])
            entries = np.empty(present.size, dtype=_ENTRY)
            entries["sym"], entries["freq"] = present, freq[i, present]
            table_parts.append(struct.pack("<H", present.size) + entries.tobytes())
        tables = _rans.RansTables.from_freqs(freq)
        tid = np.broadcast_to(np.arange(nl * 2).reshape(nl, 2, 1, 1), sym.shape)
        words, states = _rans.encode_streams(_to_streams(sym, g), _to_streams(tid, g), tables)
        tables_blob = b"".join(table_parts)
        tables_blob += b"\0" * (-len(tables_blob) % 4)
        return b"".join([_HEAD.pack(_VERSION, self.layout.itemsize, nl, t, len(words), g),
                         ref.astype(np.uint8).tobytes(), tables_blob,
                         np.array([len(w) // 2 for w in words], dtype="<u4").tobytes(),
                         states.astype("<u4").tobytes(), plane, *words])

    def decode(self, data, num_layers, num_tokens, *, meta=b"", device="cpu", out=None, layer_start=None):
        shape = self.layout.shape(num_tokens, num_layers)
        dt = torch_dtype(self.layout.dtype)
        if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dt):
            raise InvalidInput(f"out has shape {tuple(out.shape)}/{out.dtype}, expected {tuple(shape)}/{dt}")
        try:
            values = self._decode(memoryview(data), num_layers, num_tokens)
        except (ValueError, IndexError, struct.error) as exc:
            raise CorruptStream(f"lossless section is malformed: {exc}") from exc
        result = torch.from_numpy(values).view(dt).reshape(shape)
        if out is None:
            return result.to(device)
        out.copy_(result)
        return out

    def _decode(self, view: memoryview, nl: int, t: int) -> np.ndarray:
        c = self.layout.num_kv_heads * self.layout.head_dim
        version, itemsize, n_layers, n_tokens, n_streams, g = _HEAD.unpack_from(view, 0)
        if (version, itemsize, n_layers, n_tokens, g) != (_VERSION, self.layout.itemsize, nl, t,
                                                          _stream_channels(c)) or n_streams != nl * 2 * (c // g):
            raise CorruptStream("lossless section header does not match the chunk")
        pos = _HEAD.size
        ref = np.frombuffer(view, np.uint8, nl * 2 * c, pos).astype(np.int64).reshape(nl, 2, 1, c)
        pos += nl * 2 * c
        freq = np.zeros((nl * 2, 256), dtype=np.uint32)
        for i in range(nl * 2):
            (k,) = struct.unpack_from("<H", view, pos)
            entries = np.frombuffer(view, _ENTRY, k, pos + 2)
            pos += 2 + 3 * k
            if k == 0 or np.any(np.diff(entries["sym"].astype(np.int64)) <= 0) or np.any(entries["freq"] == 0) \
                    or int(entries["freq"].sum(dtype=np.int64)) != _rans.M:
                raise CorruptStream("lossless section has a malformed rANS table")
            freq[i, entries["sym"]] = entries["freq"]
        pos += -pos % 4
        counts = np.frombuffer(view, "<u4", n_streams, pos).astype(np.int64)
        pos += 4 * n_streams
        states = np.frombuffer(view, "<u4", n_streams * _rans.LANES, pos).reshape(n_streams, _rans.LANES)
        pos += 4 * states.size
        n_values = nl * 2 * t * c
        plane_bytes = n_values * (3 if self._wide else 1)
        plane = np.frombuffer(view, np.uint8, plane_bytes, pos)
        pos += plane_bytes
        if pos + 2 * int(counts.sum()) != len(view):
            raise CorruptStream("lossless section length does not match its stream table")
        words = []
        for n in counts:
            words.append(np.frombuffer(view, "<u2", int(n), pos))
            pos += 2 * int(n)
        tid = np.broadcast_to(np.arange(nl * 2).reshape(nl, 2, 1, 1), (nl, 2, t, c))
        sym = _rans.decode_streams(words, states, t * g, _to_streams(tid, g), _rans.RansTables.from_freqs(freq))
        a = (_from_streams(sym, nl, t, c, g) + ref) % 256
        a = a.reshape(-1)
        if self._wide:
            rest = np.zeros((n_values, 4), dtype=np.uint8)
            rest[:, :3] = plane.reshape(-1, 3)
            rest = rest.view("<u4").reshape(-1).astype(np.int64)
            v = ((rest & 0x800000) << 8) | (a << 23) | (rest & 0x7FFFFF)
            return v.astype(np.uint32).view(np.int32)
        b = plane.astype(np.int64)
        v = ((b & 0x80) << 8) | (a << 7) | (b & 0x7F)
        return v.astype(np.uint16).view(np.int16)
