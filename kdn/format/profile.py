"""Codec profile files as the control plane sees them: opaque bytes plus a parsed, checked header.

The file format belongs to the codec (``codec/_profile_format.py``: magic ``KDNP``, version, a sorted compact JSON
descriptor, then the arrays it describes). The controller stores and serves profiles without the codec: it checks
the header, that the descriptor is canonical and that the arrays tile the body exactly, and names the file by its
id (``blake2b(bytes, digest 16, person "kdn-profile-v1")``), which the client re-checks before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from kdn.errors import InvalidRequest

__all__ = ["ProfileHeader", "parse_profile", "profile_id", "write_atomic", "PROFILE_MAGIC", "PROFILE_VERSION"]

PROFILE_MAGIC = b"KDNP"
PROFILE_VERSION = 1
MAX_DESCRIPTOR_BYTES = 1 << 20
_HEAD = struct.Struct("<4sHI")


def profile_id(data: bytes | memoryview) -> bytes:
    """The 16-byte id of a serialized profile."""
    return hashlib.blake2b(data, digest_size=16, person=b"kdn-profile-v1").digest()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (a temporary file, then a rename): readers never see a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ProfileHeader:
    """What a profile says about itself: the model shape it was built for and its level names."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    levels: tuple[str, ...]


def parse_profile(data: bytes | memoryview) -> ProfileHeader:
    """Check a profile file's framing and return its header; raises :class:`InvalidRequest` when malformed."""
    data = memoryview(data)
    if len(data) < _HEAD.size:
        raise InvalidRequest("codec profile: shorter than its header")
    magic, version, n = _HEAD.unpack_from(data, 0)
    if magic != PROFILE_MAGIC:
        raise InvalidRequest("not a KDN codec profile (bad magic)")
    if version != PROFILE_VERSION:
        raise InvalidRequest(f"unsupported codec profile version {version}")
    if n > min(MAX_DESCRIPTOR_BYTES, len(data) - _HEAD.size):
        raise InvalidRequest("codec profile: descriptor length out of bounds")
    text = bytes(data[_HEAD.size:_HEAD.size + n])
    try:
        head = json.loads(text)
        arrays = sorted((int(d["offset"]), int(d["nbytes"])) for d in head["arrays"].values())
        header = ProfileHeader(str(head["model_id"]), int(head["num_layers"]), int(head["num_kv_heads"]),
                               int(head["head_dim"]), tuple(sorted(head["levels"])))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequest(f"codec profile: bad descriptor ({exc})") from None
    if json.dumps(head, sort_keys=True, separators=(",", ":")).encode() != text:
        raise InvalidRequest("codec profile: descriptor is not canonical (write it with ModelProfile.to_bytes)")
    body, end = len(data) - _HEAD.size - n, 0
    for offset, nbytes in arrays:
        if offset != end or nbytes < 0:
            raise InvalidRequest("codec profile: arrays do not tile the body")
        end += nbytes
    if end != body:
        raise InvalidRequest("codec profile: body length does not match its arrays")
    return header
