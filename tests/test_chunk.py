"""The chunk object format: round trips through codecs, and every kind of damage detected."""

from __future__ import annotations

import random
import struct

import pytest
import torch

from codec import available_codecs, get_codec
from kdn.errors import CorruptObject, InvalidRequest
from kdn.format.chunk import ChunkHeader, build_object, header_length, parse_header, verify_object
from kdn.format.chunk_codec import decode_chunk, encode_chunk, iter_layer_groups
from kdn.format.keys import prefix_keys
from kdn.format.layout import KVLayout
from kdn.format.mac import Keyring

LAYOUT = KVLayout("m", 6, 2, 8, "bfloat16")
KEYS = prefix_keys(list(range(20)), "t", LAYOUT.fingerprint(), "raw", 10)
KEY = str(KEYS[0][1])


def kv(n=10, dtype=torch.bfloat16, layout=LAYOUT):
    return torch.randn(layout.shape(n), generator=torch.Generator().manual_seed(n)).to(dtype)


@pytest.mark.parametrize("codec", ["raw", "lz4"])
@pytest.mark.parametrize("group", [1, 4, 6])
def test_lossless_round_trip(codec, group):
    data = kv()
    obj = encode_chunk(data, key=KEY, layout=LAYOUT, codec=codec, layer_group=group, start=256)
    header = verify_object(obj, key=KEY, fingerprint=LAYOUT.fingerprint(), codec=codec)
    assert header.num_tokens == 10 and header.start == 256 and len(header.sections) == -(-6 // group)
    out = decode_chunk(obj, key=KEY, layout=LAYOUT, codec=get_codec(codec, LAYOUT))
    assert torch.equal(out, data)
    layers = list(iter_layer_groups(obj, key=KEY, layout=LAYOUT, codec=get_codec(codec, LAYOUT)))
    assert torch.equal(torch.cat([t for _, _, t in layers]), data)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_dtypes(dtype):
    layout = KVLayout("m", 2, 1, 4, dtype)
    data = kv(5, getattr(torch, dtype), layout)
    obj = encode_chunk(data, key=KEY, layout=layout, codec="lz4")
    assert torch.equal(decode_chunk(obj, key=KEY, layout=layout, codec=get_codec("lz4", layout)), data)


def test_header_fields_and_limits():
    obj = encode_chunk(kv(), key=KEY, layout=LAYOUT, codec="raw")
    header = parse_header(obj[:header_length(obj)])
    assert isinstance(header, ChunkHeader) and header.key == KEY and header.codec == "raw"
    assert header.total_len == len(obj)
    assert [s.layer_start for s in header.sections_for(2, 4)] == [2, 3]
    with pytest.raises(CorruptObject):
        verify_object(obj, key=str(KEYS[1][1]))
    with pytest.raises(CorruptObject):
        verify_object(obj, fingerprint=b"\1" * 16)
    with pytest.raises(CorruptObject):
        verify_object(obj, codec="lz4")


def _mutants(obj: bytes, rng: random.Random):
    header_len = header_length(obj)
    for i in range(header_len):  # one bit flipped in every header byte
        m = bytearray(obj)
        m[i] ^= 1 << rng.randrange(8)
        yield bytes(m)
    for cut in list(range(0, header_len + 2)) + [len(obj) - 1, len(obj) // 2]:
        yield obj[:cut]
    yield obj + b"\0"
    for _ in range(200):
        m = bytearray(obj)
        pos = rng.randrange(header_len, len(obj))
        m[pos] = (m[pos] + rng.randrange(1, 256)) % 256
        yield bytes(m)
    m = bytearray(obj)
    m[header_len:header_len + 4096] = b"\0" * min(4096, len(obj) - header_len)
    yield bytes(m)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("codec", available_codecs())
def test_every_mutant_is_rejected(codec, signed):
    if codec not in ("raw", "lz4") and not get_codec(codec, LAYOUT).lossless:
        pytest.skip("lossy codecs are covered by their own tests")
    keyring = Keyring({"k": "s" * 32}) if signed else None
    data = kv(10)
    obj = encode_chunk(data, key=KEY, layout=LAYOUT, codec=codec, layer_group=2, keyring=keyring)
    c = get_codec(codec, LAYOUT)
    rng = random.Random(7)
    count = 0
    for mutant in _mutants(obj, rng):
        if mutant == obj:
            continue
        count += 1
        for ring in {None, keyring}:  # a signed object's damage is caught by checksum-only readers too
            with pytest.raises(CorruptObject):
                decode_chunk(mutant, key=KEY, layout=LAYOUT, codec=c, keyring=ring)
    assert count > 300


def test_header_of_one_object_on_payload_of_another():
    a = encode_chunk(kv(10), key=KEY, layout=LAYOUT, codec="raw")
    b = encode_chunk(kv(10) + 1, key=KEY, layout=LAYOUT, codec="raw")
    n = header_length(a)
    with pytest.raises(CorruptObject, match="checksum"):
        verify_object(a[:n] + b[n:], key=KEY)


def test_sections_must_cover_layers():
    fp = LAYOUT.fingerprint()
    gap = build_object(codec="raw", key=KEY, fingerprint=fp, num_tokens=1, start=0, num_layers=6,
                       sections=[(0, 2, b"ab"), (3, 6, b"cd")])
    with pytest.raises(CorruptObject, match="cover"):
        verify_object(gap)
    with pytest.raises(CorruptObject):
        build_and_parse = build_object(codec="raw", key=KEY, fingerprint=fp, num_tokens=1, start=0, num_layers=2,
                                       sections=[(0, 3, b"x")])
        parse_header(build_and_parse)


def test_hostile_lengths_do_not_allocate():
    obj = bytearray(encode_chunk(kv(), key=KEY, layout=LAYOUT, codec="raw"))
    struct.pack_into("<I", obj, 8, 0xFFFFFFFF)
    with pytest.raises(CorruptObject, match="header length"):
        parse_header(bytes(obj))


def test_wrong_shapes_are_invalid_requests():
    with pytest.raises(InvalidRequest):
        encode_chunk(torch.zeros(3, 2, 4, 2, 8, dtype=torch.bfloat16), key=KEY, layout=LAYOUT, codec="raw")
    with pytest.raises(InvalidRequest):
        encode_chunk(kv().float(), key=KEY, layout=LAYOUT, codec="raw")
    with pytest.raises(InvalidRequest):
        encode_chunk("not a tensor", key=KEY, layout=LAYOUT, codec="raw")
