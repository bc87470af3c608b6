"""The chunk object: KDN's wire and disk format for one chunk's KV.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"KDNC"
    4       2     format version (2)
    6       2     flags: bit 0 SIGNED (the object carries section digests, a key id and a MAC), bit 1
                  TENANT_KEYED (set with SIGNED: keyed by the key's tenant's key); others 0
    8       4     header_len: bytes from offset 0 to the first payload byte
    12      8     payload_len: total bytes of all sections
    20      8     header checksum: xxh3_64 of the header bytes with this field zeroed
    28      1+n   codec id (u8 length + ASCII)
    ..      1+n   key string (u8 length + ASCII; carries tenant, fingerprint, codec and digest)
    ..      16    layout fingerprint
    ..      4     num_tokens
    ..      4     start position of the chunk's first token (0 for content keys)
    ..      2     num_layers
    ..      2     num_sections
    ..      4+n   codec metadata (u32 length + bytes; codec-specific, may be empty)
    ..      e*s   section table: (layer_start u16, layer_end u16, reserved u32 (0), length u64, xxh3_64 u64)
                  and, when SIGNED, digest (32 bytes: keyed BLAKE3 of the section's bytes); e = 24 or 56
    ..      1+n   SIGNED only: MAC key id (u8 length + ASCII, 1-64 of [A-Za-z0-9._-])
    ..      32    SIGNED only: MAC, keyed BLAKE3 of header bytes [0, header_len - 32) with the checksum zeroed
    header_len    payload: sections back to back, in table order

Each section holds the KV of layers ``[layer_start, layer_end)`` encoded by the codec, and has its own checksum so
that a reader can verify and decode layer group by layer group while later sections are still arriving. Objects
are immutable: the same key always names the same bytes' meaning.

A reader verifies: magic, version, flags, lengths inside the object, the header checksum, that the key,
fingerprint and codec are those requested, and every section's checksum before its bytes are decoded. A reader
holding a :class:`~kdn.format.mac.Keyring` also requires SIGNED and TENANT_KEYED, a known key id, a key of the
tenant the object's key names, and a matching header MAC under that tenant's key (which binds every header field,
the section digests included), and checks each section against its keyed digest instead of its xxh3
(:class:`~kdn.format.mac.ForgedObject` otherwise). Readers without a keyring check the checksums of signed objects
as of unsigned ones. Version 1 objects are refused (a miss), and so, by keyring holders, are objects SIGNED without
TENANT_KEYED (signed under the cluster-wide key of earlier builds; docs/security.md, "Per-tenant keys").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from kdn.errors import CorruptObject
from kdn.format.mac import KEY_ID_RE, MAC_BYTES, ForgedObject, key_tenant

if TYPE_CHECKING:
    from kdn.format.mac import Keyring

__all__ = ["MAGIC", "FORMAT_VERSION", "FLAG_SIGNED", "FLAG_TENANT_KEYED", "Section", "ChunkHeader", "build_object",
           "parse_header", "verify_header", "verify_object", "verify_section", "header_length", "MAX_HEADER_BYTES",
           "MIN_HEADER_BYTES"]

MAGIC = b"KDNC"
FORMAT_VERSION = 2
FLAG_SIGNED = 1
FLAG_TENANT_KEYED = 2
_KNOWN_FLAGS = FLAG_SIGNED | FLAG_TENANT_KEYED
MAX_HEADER_BYTES = 1 << 20
_FIXED = struct.Struct("<4sHHIQQ")  # magic, version, flags, header_len, payload_len, header checksum
_CHECKSUM_AT = 20
_SECTION = struct.Struct("<HHIQQ")
_TAIL = struct.Struct("<16sIIHH")  # fingerprint, num_tokens, start, num_layers, num_sections
MIN_HEADER_BYTES = _FIXED.size + 2 + _TAIL.size + 4


@dataclass(frozen=True)
class Section:
    """One layer group's encoded bytes inside a chunk object."""

    layer_start: int
    layer_end: int
    offset: int
    """Offset of the section's first byte from the start of the object."""
    length: int
    checksum: int
    digest: bytes = b""
    """Keyed BLAKE3 digest of the section's bytes (signed objects; empty otherwise)."""
    key_id: str = ""
    """The MAC key id that keyed ``digest`` (the object's)."""
    tenant: str = ""
    """The tenant whose key keyed ``digest`` (the object's key's)."""


@dataclass(frozen=True)
class ChunkHeader:
    """The parsed header of a chunk object."""

    codec: str
    key: str
    fingerprint: bytes
    num_tokens: int
    start: int
    num_layers: int
    codec_meta: bytes
    sections: tuple[Section, ...]
    header_len: int
    payload_len: int
    key_id: str = ""
    """MAC key id of a signed object ("" = unsigned)."""
    authenticated: bool = False
    """Whether the header MAC was checked against a keyring."""

    @property
    def signed(self) -> bool:
        return bool(self.key_id)

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len

    def sections_for(self, layer_start: int, layer_end: int) -> list[Section]:
        """Sections that overlap layers ``[layer_start, layer_end)``."""
        return [s for s in self.sections if s.layer_start < layer_end and s.layer_end > layer_start]


def _pack_str(value: str) -> bytes:
    data = value.encode("ascii")
    if len(data) > 255:
        raise ValueError(f"string too long for chunk header: {value[:40]!r}...")
    return bytes([len(data)]) + data


def build_object(*, codec: str, key: str, fingerprint: bytes, num_tokens: int, start: int, num_layers: int,
                 sections: Sequence[tuple[int, int, bytes]], codec_meta: bytes = b"",
                 keyring: Keyring | None = None) -> bytes:
    """Serialize a chunk object from ``(layer_start, layer_end, encoded bytes)`` sections.

    With a ``keyring`` the object is signed with its active key id under the key of the tenant ``key`` names
    (section digests and header MAC; ConfigError when the keyring holds no key of that tenant).
    """
    if len(fingerprint) != 16:
        raise ValueError("fingerprint must be 16 bytes")
    tenant = key_tenant(key)
    key_id = keyring.signer(tenant) if keyring is not None else ""
    table = b"".join(
        _SECTION.pack(ls, le, 0, len(data), xxhash.xxh3_64_intdigest(data))
        + (keyring.section_digest(tenant, key_id, data) if keyring is not None else b"")
        for ls, le, data in sections)
    body = (_pack_str(codec) + _pack_str(key)
            + _TAIL.pack(fingerprint, num_tokens, start, num_layers, len(sections))
            + struct.pack("<I", len(codec_meta)) + codec_meta + table)
    if keyring is not None:
        body += _pack_str(key_id)
    header_len = _FIXED.size + len(body) + (MAC_BYTES if keyring is not None else 0)
    payload_len = sum(len(d) for _, _, d in sections)
    flags = FLAG_SIGNED | FLAG_TENANT_KEYED if keyring is not None else 0
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, header_len, payload_len, 0)
    if keyring is not None:
        body += keyring.header_mac(tenant, key_id, fixed + body)
    checksum = xxhash.xxh3_64_intdigest(fixed + body)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, header_len, payload_len, checksum)
    return b"".join([fixed, body, *(d for _, _, d in sections)])


def header_length(prefix: bytes | memoryview) -> int:
    """The full header length announced by the first 28 bytes of an object (for streaming readers)."""
    if len(prefix) < _FIXED.size:
        raise CorruptObject("chunk object shorter than its fixed header")
    magic, version, flags, header_len, _payload_len, _ = _FIXED.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise CorruptObject("bad magic: not a KDN chunk object")
    if version != FORMAT_VERSION:
        raise CorruptObject(f"unsupported chunk format version {version}")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptObject(f"unknown chunk flags {flags:#x}")
    if flags & FLAG_TENANT_KEYED and not flags & FLAG_SIGNED:
        raise CorruptObject("malformed chunk flags: TENANT_KEYED without SIGNED")
    if not MIN_HEADER_BYTES <= header_len <= MAX_HEADER_BYTES:
        raise CorruptObject(f"implausible header length {header_len}")
    return header_len


def parse_header(data: bytes | memoryview, keyring: Keyring | None = None) -> ChunkHeader:
    """Parse and checksum-verify the header at the start of ``data`` (payload bytes may be absent).

    With a ``keyring``: also authenticate it (:class:`~kdn.format.mac.ForgedObject` unless signed by a known key
    id with a matching MAC under the key of the tenant its key names).
    """
    view = memoryview(data)
    header_len = header_length(view)
    if len(view) < header_len:
        raise CorruptObject("chunk object truncated inside its header")
    _, _, flags, _, payload_len, checksum = _FIXED.unpack_from(view, 0)
    signed = bool(flags & FLAG_SIGNED)
    if keyring is not None and not signed:
        raise ForgedObject("unsigned object (a keyring holder accepts signed objects only)")
    if keyring is not None and not flags & FLAG_TENANT_KEYED:
        raise ForgedObject("object signed under the cluster-wide key of an earlier KDN, not its tenant's key "
                           "(a miss; it is re-stored signed per tenant)")
    hdr = bytearray(view[:header_len])
    hdr[_CHECKSUM_AT:_CHECKSUM_AT + 8] = b"\0" * 8
    if xxhash.xxh3_64_intdigest(hdr) != checksum:
        raise CorruptObject("header checksum mismatch")
    entry = _SECTION.size + (MAC_BYTES if signed else 0)
    try:
        pos = _FIXED.size
        n = hdr[pos]
        codec = bytes(hdr[pos + 1:pos + 1 + n]).decode("ascii")
        pos += 1 + n
        n = hdr[pos]
        key = bytes(hdr[pos + 1:pos + 1 + n]).decode("ascii")
        pos += 1 + n
        fingerprint, num_tokens, start, num_layers, num_sections = _TAIL.unpack_from(hdr, pos)
        pos += _TAIL.size
        (meta_len,) = struct.unpack_from("<I", hdr, pos)
        pos += 4
        codec_meta = bytes(hdr[pos:pos + meta_len])
        pos += meta_len
        table_at = pos
        pos += num_sections * entry
        key_id = ""
        if signed:
            n = hdr[pos]
            key_id = bytes(hdr[pos + 1:pos + 1 + n]).decode("ascii")
            pos += 1 + n + MAC_BYTES
            if not KEY_ID_RE.fullmatch(key_id):
                raise CorruptObject("malformed MAC key id")
        if pos != header_len:
            raise CorruptObject("header length does not match its fields")
        tenant = key_tenant(key)
        if keyring is not None:
            keyring.check_header(tenant, key_id, hdr[:header_len - MAC_BYTES], bytes(hdr[header_len - MAC_BYTES:]))
        sections = []
        offset = header_len
        pos = table_at
        for _ in range(num_sections):
            ls, le, _reserved, length, csum = _SECTION.unpack_from(hdr, pos)
            digest = bytes(hdr[pos + _SECTION.size:pos + entry])
            pos += entry
            if not 0 <= ls < le <= num_layers:
                raise CorruptObject(f"section layers [{ls}, {le}) outside [0, {num_layers})")
            sections.append(Section(ls, le, offset, length, csum, digest, key_id, tenant))
            offset += length
    except (struct.error, UnicodeDecodeError, IndexError) as exc:
        raise CorruptObject(f"malformed chunk header: {exc}") from exc
    if offset - header_len != payload_len:
        raise CorruptObject("section lengths do not add up to the payload length")
    return ChunkHeader(codec, key, fingerprint, num_tokens, start, num_layers, codec_meta, tuple(sections),
                       header_len, payload_len, key_id, keyring is not None)


def verify_section(data: bytes | memoryview, section: Section, keyring: Keyring | None = None) -> memoryview:
    """Return the section's bytes after checking them: against its keyed digest with a ``keyring`` (the section
    must come from a header parsed with that keyring), else against its xxh3 checksum."""
    view = memoryview(data)[section.offset:section.offset + section.length]
    if len(view) != section.length:
        raise CorruptObject("chunk object truncated inside a section")
    if keyring is not None:
        if not section.digest:
            raise ForgedObject("unsigned section (a keyring holder accepts signed objects only)")
        try:
            keyring.check_section(section.tenant, section.key_id, view, section.digest)
        except ForgedObject as exc:
            raise ForgedObject(f"{exc} in section of layers [{section.layer_start}, {section.layer_end})") from None
    elif xxhash.xxh3_64_intdigest(view) != section.checksum:
        raise CorruptObject(f"checksum mismatch in section of layers [{section.layer_start}, {section.layer_end})")
    return view


def verify_header(data: bytes | memoryview, *, key: str | None = None, fingerprint: bytes | None = None,
                  codec: str | None = None, keyring: Keyring | None = None) -> ChunkHeader:
    """Parse the header at the start of ``data`` (payload bytes may be absent) and check that it describes the
    object that was asked for: key, layout fingerprint, codec, sections covering the layers in order (with a
    ``keyring``: and authentic). Raises :class:`CorruptObject` (:class:`~kdn.format.mac.ForgedObject`)."""
    header = parse_header(data, keyring)
    if key is not None and header.key != key:
        raise CorruptObject("object carries another key (misdirected or foreign object)")
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise CorruptObject("object has another layout fingerprint")
    if codec is not None and header.codec != codec:
        raise CorruptObject(f"object codec {header.codec!r}, expected {codec!r}")
    if header.sections and (header.sections[0].layer_start != 0
                            or any(a.layer_end != b.layer_start for a, b in zip(header.sections, header.sections[1:]))
                            or header.sections[-1].layer_end != header.num_layers):
        raise CorruptObject("sections do not cover the layers exactly once in order")
    return header


def verify_object(data: bytes | memoryview, *, key: str | None = None, fingerprint: bytes | None = None,
                  codec: str | None = None, check_payload: bool = True, keyring: Keyring | None = None) -> ChunkHeader:
    """Parse ``data`` and check it is the complete, intact object that was asked for (with a ``keyring``: and
    authentic, see :func:`parse_header` and :func:`verify_section`).

    Raises :class:`CorruptObject` (:class:`~kdn.format.mac.ForgedObject` for failed authentication) on any
    mismatch; callers treat that as a miss.
    """
    header = verify_header(data, key=key, fingerprint=fingerprint, codec=codec, keyring=keyring)
    if len(data) != header.total_len:
        raise CorruptObject(f"object is {len(data)} bytes, header says {header.total_len}")
    if check_payload:
        for section in header.sections:
            verify_section(data, section, keyring)
    return header
