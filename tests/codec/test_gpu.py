"""CacheGen's GPU path against the CPU path: identical bytes, identical values, clean errors on bad input.

The GPU tests skip without CUDA + CuPy (CI has neither); the section parser they share with the CPU format is
tested everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import _gpu, get_codec
from codec.errors import CorruptStream
from codec.profile import build_profile
from kdn.format.layout import KVLayout
from tests.codec.test_cachegen import LAYOUT, synthetic_kv

gpu = pytest.mark.skipif(not _gpu.available(), reason="needs CUDA and CuPy")
LEVELS = ["high", "default", "compact"]
WIDE = KVLayout("kdn-test/wide", num_layers=2, num_kv_heads=4, head_dim=32, dtype="bfloat16")  # C=128, G=64


@pytest.fixture(scope="module")
def profile():
    return build_profile([synthetic_kv(300, s) for s in range(3)], model_id=LAYOUT.model_id)


@pytest.fixture(scope="module")
def raw_profile():
    """16-channel streams (a step of 32 lanes spans two tokens; T * G need not be a multiple of 32) and raw low
    bits of 0-3 per table, so that every part of the format is exercised."""
    prof = build_profile([synthetic_kv(300, s) for s in range(3)], model_id=LAYOUT.model_id, stream_channels=16)
    for lv in prof.levels.values():
        lv.raw_bits = (np.arange(lv.raw_bits.size) % 4).astype(np.uint8)
    return prof


@pytest.fixture(scope="module")
def wide_profile():
    return build_profile([synthetic_kv(300, s, WIDE) for s in range(2)], model_id=WIDE.model_id, stream_channels=64)


def _parse(codec, data: bytes, nl: int, t: int):
    p = codec.profile
    lay_bits = codec._tables.raw_bits[codec._tables.level.table_of[:nl]].astype(np.int64)
    s_n = nl * 2 * (p.channels // p.stream_channels)
    runs = (t * lay_bits.reshape(s_n, -1).sum(axis=1) + 7) // 8
    return _gpu._parse(memoryview(data), nl, t, p.channels, s_n, 2, p.chunk_key_mean, t * p.stream_channels,
                       int(runs.sum()))


def test_parse_matches_the_section_layout(profile):
    codec = get_codec("cachegen-default", LAYOUT, profile=profile)
    kv = synthetic_kv(256, 5)
    data = codec.encode(kv)
    q = _parse(codec, data, 4, 256)
    assert q["words"] + 2 * int(q["counts"].sum()) == len(data)
    assert set(q["verbatim"]) == {0, 1, 2, 3}  # synthetic_kv's sink token is tiny in every layer
    # key means (bf16, layers x channels), then one u32 word count per stream, then the states
    assert q["states"] - 4 * q["counts"].size == q["keymeans"] + 2 * 4 * LAYOUT.num_kv_heads * LAYOUT.head_dim
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptStream):
            _parse(codec, data[:cut], 4, 256)
    with pytest.raises(CorruptStream):
        _parse(codec, data + b"\0\0", 4, 256)


def _cuda_kv(tokens: int, seed: int, layout=LAYOUT) -> torch.Tensor:
    return synthetic_kv(tokens, seed, layout).cuda()


@gpu
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("tokens,seed", [(256, 3), (37, -4), (1, 5), (2, 6)])
@pytest.mark.parametrize("which", ["profile", "raw_profile"])
def test_gpu_bytes_and_values_match_cpu(request, which, level, tokens, seed):
    codec = get_codec(f"cachegen-{level}", LAYOUT, profile=request.getfixturevalue(which))
    kv = synthetic_kv(tokens, seed)  # seed < 0: heavy tails, so escapes occur
    cpu_bytes = codec.encode(kv)
    assert codec.encode(kv.cuda()) == cpu_bytes
    ref = codec.decode(cpu_bytes, 4, tokens, meta=codec.meta())
    out = codec.decode(cpu_bytes, 4, tokens, meta=codec.meta(), device="cuda")
    assert out.is_cuda and torch.equal(out.cpu(), ref)


@gpu
@pytest.mark.parametrize("group", [1, 3])
def test_gpu_layer_groups(profile, group):
    codec = get_codec("cachegen-default", LAYOUT, profile=profile)
    kv = synthetic_kv(96, -7)
    for start in range(0, 4 - group + 1, group):
        part = kv[start:start + group]
        data = codec.encode(part, layer_start=start)
        assert codec.encode(part.cuda(), layer_start=start) == data
        ref = codec.decode(data, group, 96, meta=codec.meta(), layer_start=start)
        got = codec.decode(data, group, 96, meta=codec.meta(), device="cuda", layer_start=start)
        assert torch.equal(got.cpu(), ref)


@gpu
def test_gpu_batch_into_strided_cache(wide_profile):
    """Several chunks decode in one batch straight into token slices of one cache tensor."""
    codec = get_codec("cachegen-compact", WIDE, profile=wide_profile)
    kv = synthetic_kv(4 * 64, -9, WIDE).cuda()
    chunks = [kv[:, :, i * 64:(i + 1) * 64] for i in range(4)]
    datas = codec.encode_batch(chunks)
    assert datas == [codec.encode(c.cpu()) for c in chunks]
    cache = torch.full_like(kv, float("nan"))
    outs = [cache[:, :, i * 64:(i + 1) * 64] for i in range(4)]
    codec.decode_batch(datas, 2, 64, meta=codec.meta(), outs=outs)
    ref = torch.cat([codec.decode(d, 2, 64, meta=codec.meta()) for d in datas], dim=2)
    assert torch.equal(cache.cpu(), ref)
    g = _gpu.for_codec(codec, "cuda")
    bad = [datas[0], datas[1][:-2] + b"\0\0", datas[2], datas[3]]
    with pytest.raises(CorruptStream, match="section 1"):
        g.run(g.prepare(bad, 2, 64, 0, 2), outs)


@gpu
@pytest.mark.parametrize("which", ["profile", "raw_profile"])
def test_gpu_bad_input_agrees_with_cpu(request, which):
    """Truncated, extended, corrupt and foreign sections: both paths raise CorruptStream, or both decode the same
    values (a lossy section cannot detect every flip in raw bits or sink values)."""
    profile = request.getfixturevalue(which)
    codec = get_codec("cachegen-default", LAYOUT, profile=profile)
    data = codec.encode(synthetic_kv(256, -2))
    rng = np.random.default_rng(0)
    cases = [data[:len(data) // 2], data[:-1], data + b"\0\0", b"", b"\xff" * len(data)]
    for _ in range(60):
        b = bytearray(data)
        for pos in rng.integers(0, len(b), size=int(rng.integers(1, 4))):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(b))
    for case in cases:
        try:
            ref = codec.decode(case, 4, 256, meta=codec.meta())
        except CorruptStream:
            ref = None
        if ref is None:
            with pytest.raises(CorruptStream):
                codec.decode(case, 4, 256, meta=codec.meta(), device="cuda")
        else:
            assert torch.equal(codec.decode(case, 4, 256, meta=codec.meta(), device="cuda").cpu(), ref)
    foreign = get_codec("cachegen-high", LAYOUT, profile=profile)
    for device in ("cpu", "cuda"):  # another level's tables: the streams do not end cleanly
        with pytest.raises(CorruptStream):
            foreign.decode(data, 4, 256, meta=foreign.meta(), device=device)


@gpu
def test_gpu_global_table_decoder(raw_profile, monkeypatch):
    """Stream types whose tables do not fit shared memory use the decoder that reads tables from global memory."""
    monkeypatch.setattr(_gpu, "_SMEM_LIMIT", 0)
    codec = get_codec("cachegen-high", LAYOUT, profile=raw_profile)
    assert _gpu.for_codec(codec, "cuda").layers(0, 4).smem == 0
    for tokens, seed in [(37, -4), (256, 3)]:
        data = codec.encode(synthetic_kv(tokens, seed))
        ref = codec.decode(data, 4, tokens, meta=codec.meta())
        assert torch.equal(codec.decode(data, 4, tokens, meta=codec.meta(), device="cuda").cpu(), ref)
    with pytest.raises(CorruptStream):
        codec.decode(data[:-2], 4, 256, meta=codec.meta(), device="cuda")
