"""KV tensor <-> chunk object: the codec applied layer group by layer group inside the chunk format."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import codec as codecs
from codec.errors import CodecError, CorruptStream, InvalidInput
from kdn.errors import CorruptObject, InvalidRequest, KDNError
from kdn.format.chunk import ChunkHeader, build_object, verify_object, verify_section

if TYPE_CHECKING:
    import torch

    from codec.base import Codec
    from kdn.format.layout import KVLayout
    from kdn.format.mac import Keyring

__all__ = ["encode_chunk", "decode_chunk", "iter_layer_groups", "codec_errors", "get_codec", "check_kv"]


@contextmanager
def codec_errors() -> Iterator[None]:
    """Map the codec's own errors onto KDN's tree: bad input -> InvalidRequest, bad stream -> CorruptObject."""
    try:
        yield
    except CorruptStream as exc:
        raise CorruptObject(str(exc)) from exc
    except InvalidInput as exc:
        raise InvalidRequest(str(exc)) from exc
    except CodecError as exc:
        raise KDNError(str(exc)) from exc


def get_codec(name: str, layout: KVLayout, **options) -> Codec:
    """The codec ``name`` for ``layout`` (errors in KDN's tree)."""
    with codec_errors():
        return codecs.get_codec(name, layout, **options)


def check_kv(kv: torch.Tensor, layout: KVLayout) -> None:
    """Raise InvalidRequest unless ``kv`` is ``[layers, 2, tokens, heads, dim]`` of the layout's dtype."""
    from codec.raw import check_kv as _check

    with codec_errors():
        _check(kv, layout)


def encode_chunk(kv: torch.Tensor, *, key: str, layout: KVLayout, codec: Codec | str, start: int = 0,
                 layer_group: int = 1, keyring: Keyring | None = None) -> bytes:
    """Encode one chunk's KV (``[layers, 2, tokens, heads, dim]``) into a chunk object (signed with a keyring)."""
    check_kv(kv, layout)
    if isinstance(codec, str):
        codec = get_codec(codec, layout)
    group = max(1, int(layer_group))
    with codec_errors():
        sections = [(ls, min(ls + group, layout.num_layers), codec.encode(kv[ls:ls + group], layer_start=ls))
                    for ls in range(0, layout.num_layers, group)]
    return build_object(codec=codec.name, key=key, fingerprint=layout.fingerprint(), num_tokens=kv.shape[2],
                        start=start, num_layers=layout.num_layers, sections=sections, codec_meta=codec.meta(),
                        keyring=keyring)


MAX_CHUNK_TOKENS = 1 << 16
"""Tokens one chunk object may declare (chunks are hundreds of tokens; the header field is 32 bits)."""
MAX_EXPANSION = 1024
"""Decoded KV bytes per payload byte a header may declare, beyond ``_EXPANSION_SLACK`` (no codec compresses KV
that far; a forged token count must not drive the output allocation)."""
_EXPANSION_SLACK = 64 << 20


def _check_header(header: ChunkHeader, layout: KVLayout) -> None:
    if header.num_layers != layout.num_layers:
        raise CorruptObject(f"object has {header.num_layers} layers, layout has {layout.num_layers}")
    decoded = header.num_tokens * layout.bytes_per_token
    if header.num_tokens > MAX_CHUNK_TOKENS or decoded > MAX_EXPANSION * header.payload_len + _EXPANSION_SLACK:
        raise CorruptObject(f"object declares {header.num_tokens} tokens ({decoded} bytes of KV) for "
                            f"{header.payload_len} payload bytes")


def iter_layer_groups(data: bytes | memoryview, *, key: str, layout: KVLayout, codec: Codec, device="cpu",
                      keyring: Keyring | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Verify (authenticate, with a keyring) and decode ``data`` one section at a time: yields
    ``(layer_start, layer_end, kv)``."""
    header = verify_object(data, key=key, fingerprint=layout.fingerprint(), codec=codec.name, check_payload=False,
                           keyring=keyring)
    _check_header(header, layout)
    for section in header.sections:
        view = verify_section(data, section, keyring)
        with codec_errors():
            kv = codec.decode(view, section.layer_end - section.layer_start, header.num_tokens,
                              meta=header.codec_meta, device=device, layer_start=section.layer_start)
        yield section.layer_start, section.layer_end, kv


def decode_chunk(data: bytes | memoryview, *, key: str, layout: KVLayout, codec: Codec, device="cpu",
                 out: torch.Tensor | None = None, keyring: Keyring | None = None) -> torch.Tensor:
    """Verify (authenticate, with a keyring) and decode a whole chunk object into ``out``
    (``[layers, 2, tokens, heads, dim]``) or a new tensor.

    Raises :class:`CorruptObject` if anything does not match; nothing is written to ``out`` in that case
    unless a later section fails after earlier ones were decoded (callers treat the chunk as a miss).
    """
    import torch

    header = verify_object(data, key=key, fingerprint=layout.fingerprint(), codec=codec.name, keyring=keyring)
    _check_header(header, layout)
    if out is None:
        from codec.raw import torch_dtype

        out = torch.empty(layout.shape(header.num_tokens), dtype=torch_dtype(layout.dtype), device=device)
    elif out.shape[2] != header.num_tokens:
        raise CorruptObject(f"object holds {header.num_tokens} tokens, expected {out.shape[2]}")
    for section in header.sections:
        view = memoryview(data)[section.offset:section.offset + section.length]
        with codec_errors():
            codec.decode(view, section.layer_end - section.layer_start, header.num_tokens, meta=header.codec_meta,
                         device=device, out=out[section.layer_start:section.layer_end],
                         layer_start=section.layer_start)
    return out
