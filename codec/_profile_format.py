"""The model profile's data and its binary file format (no pickle).

File layout (little-endian)::

    0    4   magic b"KDNP"
    4    2   format version (1)
    6    4   n = length of the JSON descriptor
    10   n   JSON descriptor (UTF-8, sorted keys): scalar fields, level definitions and, for every array,
             {"dtype": "<f4"|"<u2"|"<i2"|..., "shape": [...], "offset": o, "nbytes": b}
    10+n ..  array bytes; offset ``o`` counts from the first byte after the descriptor

The profile id is the first 16 bytes of ``blake2b(file bytes, person=b"kdn-profile-v1")``; two equal profiles
serialize to the same bytes, hence the same id.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codec.errors import InvalidInput

__all__ = ["ModelProfile", "LevelProfile", "PROFILE_MAGIC", "PROFILE_VERSION", "profile_id"]

PROFILE_MAGIC = b"KDNP"
PROFILE_VERSION = 1
_HEAD = struct.Struct("<4sHI")
_DTYPES = {"<f4", "<u2", "<i2", "|u1", "<i4"}


def profile_id(data: bytes | memoryview) -> bytes:
    """The 16-byte id of a serialized profile (see the module docstring)."""
    return hashlib.blake2b(data, digest_size=16, person=b"kdn-profile-v1").digest()


@dataclass
class LevelProfile:
    """One lossy level: quantization steps and rANS tables, indexed by transform coefficient.

    The step of coefficient ``c`` of layer ``l``'s keys or values (``kv``) is ``step_int[l, kv, c] * 2**-step_shift``.
    ``table_of[l, kv, c]`` selects the table coding that coefficient; table ``t`` codes ``u = z >> raw_bits[t]``
    (``z`` the integer level) as symbol ``u - lo[t] + 1`` when that lies in ``[1, size[t])``, else as symbol 0
    (escape; ``z`` travels in the section's exception list). ``freq[t]`` sums to 4096 and is zero past ``size[t]``.
    """

    name: str
    step_int: np.ndarray  # uint16 [L, 2, C], each in [1, 4096)
    step_shift: int
    table_of: np.ndarray  # uint16 [L, 2, C]
    lo: np.ndarray  # int16 [T]
    raw_bits: np.ndarray  # uint8 [T]
    size: np.ndarray  # uint16 [T] alphabet size including the escape symbol
    freq: np.ndarray  # uint16 [T, A]
    info: dict = field(default_factory=dict)

    @property
    def step(self) -> np.ndarray:
        """Steps as float64 (exact)."""
        return self.step_int.astype(np.float64) * 2.0 ** -self.step_shift


@dataclass
class ModelProfile:
    """Per-model statistics that the CacheGen codec needs; built once per model, shared by encoder and decoder.

    Values of layer ``l``, ``kv``, channel ``c`` are centred and weighted, ``w = (x - mean) * weight``, then each
    group of ``stream_channels`` channels is rotated by the orthonormal matrix ``transform[l, kv, g] / 2**13``
    (int16; identity when the profile was built without a transform).
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    stream_channels: int
    """Channels per rANS stream and per transform block (divides ``num_kv_heads * head_dim``)."""
    mean: np.ndarray  # float32 [L, 2, C]
    weight: np.ndarray  # float32 [L, 2, C], positive
    transform: np.ndarray  # int16 [L, 2, C // G, G, G]; coefficient j of group g = sum_i w[g*G + i] * T[i, j]
    input_shift: int
    """Fixed-point bits of the weighted input (``rint(w * 2**input_shift)``, clipped to +-2**31)."""
    sink_ratio: np.ndarray  # float32 [L]: token 0 of a section is stored verbatim when its V norm is below
    #                          sink_ratio[l] * median V norm of the section's tokens in that layer
    levels: dict[str, LevelProfile]
    chunk_key_mean: bool = True
    """Keys are centred on a per-section mean (stored in the section, bf16) instead of ``mean[:, 0]``: RoPE rotates
    the keys' mean with position, and within one chunk it barely moves."""
    info: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check(self) -> None:
        """Raise InvalidInput unless every array is consistent."""
        L, C, G = self.num_layers, self.channels, self.stream_channels
        if G <= 0 or C % G or G > 256:
            raise InvalidInput("profile: stream_channels must divide kv_heads * head_dim and be <= 256")
        if self.mean.shape != (L, 2, C) or self.weight.shape != (L, 2, C) or self.sink_ratio.shape != (L,):
            raise InvalidInput("profile: mean/weight/sink_ratio shape mismatch")
        if self.transform.shape != (L, 2, C // G, G, G) or not 0 <= self.input_shift <= 40:
            raise InvalidInput("profile: transform shape or input_shift invalid")
        if not (np.all(np.isfinite(self.weight)) and np.all(self.weight > 0) and np.all(np.isfinite(self.mean))):
            raise InvalidInput("profile: weights must be positive and finite")
        if np.any(np.abs(self.transform.astype(np.int64)) > 1 << 13):
            raise InvalidInput("profile: transform entries exceed 2**13")
        for lv in self.levels.values():
            T = lv.lo.shape[0]
            if lv.step_int.shape != (L, 2, C) or lv.table_of.shape != (L, 2, C):
                raise InvalidInput(f"profile level {lv.name}: array shape mismatch")
            if np.any(lv.step_int < 1) or np.any(lv.step_int >= 1 << 12) or not 0 <= lv.step_shift <= 60:
                raise InvalidInput(f"profile level {lv.name}: steps out of range")
            if int(lv.table_of.max()) >= T or lv.freq.shape[0] != T or lv.raw_bits.shape != (T,):
                raise InvalidInput(f"profile level {lv.name}: table index out of range")
            if np.any(lv.raw_bits > 15) or np.any(lv.size < 2) or np.any(lv.size > lv.freq.shape[1]):
                raise InvalidInput(f"profile level {lv.name}: bad table parameters")

    # -- serialization ------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean.astype("<f4"), "weight": self.weight.astype("<f4"),
                  "transform": self.transform.astype("<i2"), "sink_ratio": self.sink_ratio.astype("<f4")}
        for name, lv in self.levels.items():
            arrays.update({f"{name}.step_int": lv.step_int.astype("<u2"), f"{name}.table_of": lv.table_of.astype("<u2"),
                           f"{name}.lo": lv.lo.astype("<i2"), f"{name}.raw_bits": lv.raw_bits.astype("<u1"),
                           f"{name}.size": lv.size.astype("<u2"), f"{name}.freq": lv.freq.astype("<u2")})
        return arrays

    def to_bytes(self) -> bytes:
        self.check()
        arrays = self._arrays()
        desc, blobs, offset = {}, [], 0
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name])
            desc[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
            blobs.append(a.tobytes())
            offset += a.nbytes
        head = {"model_id": self.model_id, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "stream_channels": self.stream_channels, "input_shift": self.input_shift,
                "chunk_key_mean": self.chunk_key_mean,
                "info": self.info, "arrays": desc,
                "levels": {n: {"step_shift": lv.step_shift, "info": lv.info} for n, lv in self.levels.items()}}
        text = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
        return _HEAD.pack(PROFILE_MAGIC, PROFILE_VERSION, len(text)) + text + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> ModelProfile:
        data = bytes(data)
        try:
            magic, version, n = _HEAD.unpack_from(data, 0)
            if magic != PROFILE_MAGIC:
                raise InvalidInput("not a KDN model profile (bad magic)")
            if version != PROFILE_VERSION:
                raise InvalidInput(f"unsupported model profile version {version}")
            head = json.loads(data[_HEAD.size:_HEAD.size + n])
            body = memoryview(data)[_HEAD.size + n:]
            arrays = {}
            for name, d in head["arrays"].items():
                if d["dtype"] not in _DTYPES:
                    raise InvalidInput(f"profile array {name}: dtype {d['dtype']} not allowed")
                dt = np.dtype(d["dtype"])
                count = int(np.prod(d["shape"], dtype=np.int64))
                if count * dt.itemsize != d["nbytes"] or d["offset"] < 0 or d["offset"] + d["nbytes"] > len(body):
                    raise InvalidInput(f"profile array {name} out of bounds")
                a = np.frombuffer(body, dt, count, d["offset"]).reshape(d["shape"])
                arrays[name] = a.astype(dt.newbyteorder("="))
            levels = {}
            for name, lv in head["levels"].items():
                levels[name] = LevelProfile(
                    name=name, step_int=arrays[f"{name}.step_int"], step_shift=int(lv["step_shift"]),
                    table_of=arrays[f"{name}.table_of"], lo=arrays[f"{name}.lo"], raw_bits=arrays[f"{name}.raw_bits"],
                    size=arrays[f"{name}.size"], freq=arrays[f"{name}.freq"], info=lv.get("info", {}))
            prof = cls(model_id=head["model_id"], num_layers=int(head["num_layers"]),
                       num_kv_heads=int(head["num_kv_heads"]), head_dim=int(head["head_dim"]),
                       stream_channels=int(head["stream_channels"]), mean=arrays["mean"], weight=arrays["weight"],
                       transform=arrays["transform"], input_shift=int(head["input_shift"]),
                       sink_ratio=arrays["sink_ratio"], levels=levels, chunk_key_mean=bool(head["chunk_key_mean"]),
                       info=head.get("info", {}))
        except (KeyError, ValueError, TypeError, struct.error) as exc:
            raise InvalidInput(f"malformed model profile: {exc}") from exc
        prof.check()
        return prof

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        return cls.from_bytes(Path(path).read_bytes())

    def profile_id(self) -> bytes:
        """16-byte id of this profile (hash of its serialized bytes); recorded in every chunk it encodes."""
        return profile_id(self.to_bytes())
