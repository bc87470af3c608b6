"""The ``lossless`` codec: bit-exact for every dtype and bit pattern, deterministic, smaller than lz4 on KV."""

from __future__ import annotations

import random

import pytest
import torch

from codec import get_codec
from codec.errors import CorruptStream
from kdn.format.chunk_codec import decode_chunk, encode_chunk
from kdn.format.layout import KVLayout


def kv_like(layout: KVLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(layout.num_layers, 2, 1, layout.num_kv_heads, layout.head_dim, generator=g))
    x = torch.randn(layout.shape(tokens), generator=g) * scale
    return x.to(getattr(torch, layout.dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("group", [1, 3])
def test_bit_exact(dtype, group):
    layout = KVLayout("toy", 3, 2, 16, dtype)
    kv = kv_like(layout, 37)
    flat = kv.view(-1)
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e38 if dtype != "float16" else -6e4]
    flat[:len(specials)] = torch.tensor(specials).to(kv.dtype)
    codec = get_codec("lossless", layout)
    obj = encode_chunk(kv, key="k", layout=layout, codec=codec, layer_group=group)
    out = decode_chunk(obj, key="k", layout=layout, codec=codec)
    bits = torch.int32 if dtype == "float32" else torch.int16
    assert torch.equal(out.view(bits), kv.view(bits))
    assert obj == encode_chunk(kv, key="k", layout=layout, codec=codec, layer_group=group)


def test_all_bit_patterns():
    layout = KVLayout("toy", 1, 1, 256, "bfloat16")
    kv = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(1, 2, 128, 1, 256)
    codec = get_codec("lossless", layout)
    out = codec.decode(codec.encode(kv), 1, 128)
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_beats_lz4_on_kv_like_data():
    layout = KVLayout("toy", 4, 2, 64, "bfloat16")
    kv = kv_like(layout, 256, 3)
    raw = kv.numel() * 2
    ours = len(encode_chunk(kv, key="k", layout=layout, codec="lossless"))
    lz4 = len(encode_chunk(kv, key="k", layout=layout, codec="lz4"))
    assert raw / ours > 1.25 and ours < lz4


def test_damage_is_detected_or_harmless():
    layout = KVLayout("toy", 2, 2, 16, "bfloat16")
    codec = get_codec("lossless", layout)
    data = codec.encode(kv_like(layout, 40))
    rng = random.Random(1)
    for i in range(150):
        m = bytearray(data)
        if i % 3 == 0:
            m = m[:rng.randrange(len(m))]
        else:
            m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
        try:
            assert codec.decode(bytes(m), 2, 40).shape == (2, 2, 40, 2, 16)
        except CorruptStream:
            pass
    with pytest.raises(CorruptStream):
        codec.decode(data, 2, 41)
    with pytest.raises(CorruptStream):
        codec.decode(data + b"\0\0", 2, 40)
