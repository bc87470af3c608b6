"""Chunk keys: prefix-chain keys and content keys, scoped by tenant, layout fingerprint and codec.

A prompt of ``n`` tokens is cut into chunks of ``chunk_size`` tokens (default 256). Prefix keys chain a hash
over every token so far, ``h_i = H(h_{i-1} || tokens_i)``, seeded with the tenant and the layout fingerprint, so
a hit on chunk ``i`` means the exact prefix ``tokens[0 : end_i]`` under the same model layout and tenant. The same
prompt under two tenants gives unrelated digests, so shared backends cannot correlate tenants' prompts.

The last chunk may be *partial* (fewer than ``chunk_size`` tokens). Its key hashes exactly its tokens, so it hits
only a prompt whose tail has the same tokens and the same length (e.g. a repeated prompt). Full chunks of a longer
prompt never collide with it.

Content keys hash only a chunk's own tokens (plus tenant and fingerprint) and mark KV computed at position 0, for
reuse at any position (CacheBlend).

String form (used by tiers, the index and the wire): ``{tenant}/{fingerprint hex}/{codec}/{p|c}{digest hex}``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from kdn.errors import InvalidRequest

__all__ = ["KeyKind", "ChunkKey", "ChunkSpan", "prefix_keys", "content_key", "chunk_spans", "validate_name"]

DIGEST_BYTES = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_KEY_RE = re.compile(r"^([^/]+)/([0-9a-f]{32})/([^/]+)/([pc])([0-9a-f]{40})$")


def validate_name(kind: str, value: str) -> str:
    """Tenant and codec names: 1-64 chars of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidRequest(f"invalid {kind} name {value!r}: use 1-64 characters of [A-Za-z0-9_.-]")
    return value


class KeyKind(StrEnum):
    PREFIX = "p"
    CONTENT = "c"


@dataclass(frozen=True)
class ChunkKey:
    """The identity of one stored chunk object."""

    tenant: str
    fingerprint: bytes
    codec: str
    kind: KeyKind
    digest: bytes

    def __str__(self) -> str:
        return f"{self.tenant}/{self.fingerprint.hex()}/{self.codec}/{self.kind.value}{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        match = _KEY_RE.match(text) if isinstance(text, str) else None
        if not match:
            raise InvalidRequest(f"malformed chunk key {text!r}")
        tenant, fp, codec, kind, digest = match.groups()
        validate_name("tenant", tenant)
        validate_name("codec", codec)
        return cls(tenant, bytes.fromhex(fp), codec, KeyKind(kind), bytes.fromhex(digest))


@dataclass(frozen=True)
class ChunkSpan:
    """Where a chunk sits in a prompt: tokens ``[start, end)``."""

    index: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def chunk_spans(num_tokens: int, chunk_size: int, include_partial: bool = True) -> list[ChunkSpan]:
    """Cut ``num_tokens`` into chunk spans; the last one is partial unless ``num_tokens`` divides evenly."""
    if chunk_size <= 0:
        raise InvalidRequest(f"chunk_size must be positive, got {chunk_size}")
    spans = [ChunkSpan(i, s, s + chunk_size) for i, s in enumerate(range(0, num_tokens - chunk_size + 1, chunk_size))]
    tail = num_tokens % chunk_size
    if include_partial and tail:
        spans.append(ChunkSpan(len(spans), num_tokens - tail, num_tokens))
    return spans


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        import array

        return array.array("I", tokens).tobytes()
    except (OverflowError, TypeError) as exc:
        raise InvalidRequest("tokens must be non-negative ints below 2**32") from exc


def _as_list(tokens) -> list[int]:
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return list(tokens)


def prefix_keys(tokens, tenant: str, fingerprint: bytes, codec: str, chunk_size: int,
                include_partial: bool = True) -> list[tuple[ChunkSpan, ChunkKey]]:
    """The prefix-chain keys of every chunk of ``tokens`` (a list, array or 1-D tensor of token ids)."""
    validate_name("tenant", tenant)
    validate_name("codec", codec)
    toks = _as_list(tokens)
    seed = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"kdn-prefix-v1")
    seed.update(tenant.encode() + b"\0" + fingerprint)
    prev = seed.digest()
    out = []
    for span in chunk_spans(len(toks), chunk_size, include_partial):
        h = hashlib.blake2b(prev, digest_size=DIGEST_BYTES, person=b"kdn-prefix-v1")
        h.update(_token_bytes(toks[span.start:span.end]))
        prev = h.digest()
        out.append((span, ChunkKey(tenant, fingerprint, codec, KeyKind.PREFIX, prev)))
    return out


def content_key(tokens, tenant: str, fingerprint: bytes, codec: str) -> ChunkKey:
    """The position-independent key of one chunk's tokens (KV computed starting at position 0)."""
    validate_name("tenant", tenant)
    validate_name("codec", codec)
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"kdn-content-v1")
    h.update(tenant.encode() + b"\0" + fingerprint)
    h.update(_token_bytes(_as_list(tokens)))
    return ChunkKey(tenant, fingerprint, codec, KeyKind.CONTENT, h.digest())
