"""CacheGen levels on synthetic KV: chunk round trips, error bounds, determinism, profiles, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from codec import available_codecs, get_codec
from codec.errors import CorruptStream, InvalidInput
from codec.profile import ModelProfile, build_profile
from kdn.errors import CorruptObject
from kdn.format.chunk_codec import decode_chunk, encode_chunk
from kdn.format.layout import KVLayout

LAYOUT = KVLayout("kdn-test/toy", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16")
LEVELS = ["high", "default", "compact"]


def synthetic_kv(tokens: int, seed: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    """KV with per-channel means and scales, heavy tails, and a low-norm sink token 0 (like real models)."""
    g = torch.Generator().manual_seed(seed)
    shape = layout.shape(tokens)
    scale = torch.exp(torch.randn(layout.num_layers, 2, 1, layout.num_kv_heads, layout.head_dim,
                                  generator=torch.Generator().manual_seed(0)))
    mean = torch.randn(scale.shape, generator=torch.Generator().manual_seed(1)) * 2
    x = torch.distributions.StudentT(4.0).sample(shape) if seed < 0 else torch.randn(shape, generator=g)
    x = x * scale + mean
    x[:, 1, 0] *= 0.05  # the sink: tiny values
    return x.to(torch.bfloat16)


@pytest.fixture(scope="module")
def profile() -> ModelProfile:
    return build_profile([synthetic_kv(300, s) for s in range(3)], model_id=LAYOUT.model_id)


@pytest.mark.parametrize("level", LEVELS)
def test_chunk_round_trip(profile, level):
    codec = get_codec(f"cachegen-{level}", LAYOUT, profile=profile)
    kv = synthetic_kv(256, 11)
    obj = encode_chunk(kv, key="k", layout=LAYOUT, codec=codec, layer_group=LAYOUT.num_layers)
    out = decode_chunk(obj, key="k", layout=LAYOUT, codec=codec)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    x, y = kv.float(), out.float()
    # in the weighted, rotated domain every coefficient is within half a step (plus bf16 rounding)
    w = torch.from_numpy(profile.weight).reshape(4, 2, 1, 32).double()
    q = torch.from_numpy(profile.transform).double().reshape(4, 2, 32, 32) / 2 ** 13
    err = torch.einsum("lktc,lkcd->lktd", (y - x).reshape(4, 2, 256, 32).double() * w, q)
    bf16 = torch.einsum("lktc,lkcd->lktd", (y.abs() * 2 ** -8).reshape(4, 2, 256, 32).double() * w, q.abs())
    step = torch.from_numpy(profile.levels[level].step).reshape(4, 2, 1, 32)
    assert torch.all(err[:, :, 1:].abs() <= step / 2 * 1.01 + bf16[:, :, 1:] + 1e-3)
    assert torch.equal(out[:, 1, 0], kv[:, 1, 0]) and torch.equal(out[:, 0, 0], kv[:, 0, 0])  # sink: verbatim
    assert kv.numel() * 2 / len(obj) > {"high": 2.0, "default": 3.5, "compact": 5.0}[level]
    assert obj == encode_chunk(kv, key="k", layout=LAYOUT, codec=codec, layer_group=LAYOUT.num_layers)


@pytest.mark.parametrize("group", [1, 3])
def test_layer_groups_need_layer_start(profile, group):
    codec = get_codec("cachegen-default", LAYOUT, profile=profile)
    kv = synthetic_kv(40, 12)
    whole = codec.decode(codec.encode(kv), 4, 40, meta=codec.meta())
    parts = []
    for ls in range(0, 4, group):
        part = kv[ls:ls + group]
        data = codec.encode(part, layer_start=ls)
        parts.append(codec.decode(data, part.shape[0], 40, meta=codec.meta(), layer_start=ls))
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(InvalidInput, match="layer_start"):
        codec.encode(kv[:1])


def test_chunk_with_layer_groups(profile):
    """Through kdn.format.chunk_codec, which passes each section's layer_start to the codec."""
    codec = get_codec("cachegen-default", LAYOUT, profile=profile)
    kv = synthetic_kv(64, 13)
    obj = encode_chunk(kv, key="k", layout=LAYOUT, codec=codec, layer_group=2)
    out = decode_chunk(obj, key="k", layout=LAYOUT, codec=codec)
    assert torch.equal(out, codec.decode(codec.encode(kv), 4, 64, meta=codec.meta()))


@pytest.mark.parametrize("tokens", [1, 2, 33, 100])
def test_odd_token_counts_without_transform(tokens):
    prof = build_profile([synthetic_kv(120, s) for s in range(2)], model_id="toy", transform=False,
                         levels={"default": 0.5})
    assert np.array_equal(prof.transform[0, 0, 0], np.eye(32) * 2 ** 13)
    codec = get_codec("cachegen-default", LAYOUT, profile=prof)
    kv = synthetic_kv(tokens, 14)
    out = codec.decode(codec.encode(kv), 4, tokens, meta=codec.meta())
    err = (out.float() - kv.float()).norm() / kv.float().norm()
    assert out.shape == kv.shape and err < 0.2


def test_outliers_escape_exactly_enough(profile):
    codec = get_codec("cachegen-high", LAYOUT, profile=profile)
    kv = synthetic_kv(64, 15)
    kv[2, 0, 7, 1, 3] = 3000.0
    kv[0, 1, 9, 0, 0] = -1e30
    out = codec.decode(codec.encode(kv), 4, 64, meta=codec.meta()).float()
    assert abs(out[2, 0, 7, 1, 3].item() - kv[2, 0, 7, 1, 3].item()) <= 16  # bf16 spacing at 3000
    assert out[0, 1, 9, 0, 0].item() < -1e3  # clipped far outside the profiled range, sign kept
    with pytest.raises(InvalidInput):
        kv[0, 0, 0, 0, 0] = float("nan")
        codec.encode(kv)


def test_profile_serialization_and_id(profile, tmp_path):
    data = profile.to_bytes()
    again = ModelProfile.from_bytes(data)
    assert again.to_bytes() == data and again.profile_id() == profile.profile_id()
    profile.save(tmp_path / "p.kdnp")
    codec = get_codec("cachegen-compact", LAYOUT, profile=str(tmp_path / "p.kdnp"))
    assert codec.meta() == get_codec("cachegen-compact", LAYOUT, profile=profile).meta()
    for bad in (b"", b"XXXX" + data[4:], data[:100], data[:-1]):
        with pytest.raises(InvalidInput):
            ModelProfile.from_bytes(bad)


def test_wrong_profile_refused(profile):
    other = build_profile([synthetic_kv(64, s + 50) for s in range(2)], model_id=LAYOUT.model_id)
    a = get_codec("cachegen-default", LAYOUT, profile=profile)
    b = get_codec("cachegen-default", LAYOUT, profile=other)
    obj = encode_chunk(synthetic_kv(32, 16), key="k", layout=LAYOUT, codec=a, layer_group=4)
    with pytest.raises(CorruptObject, match="another model profile|profile"):  # through KDN: its error tree
        decode_chunk(obj, key="k", layout=LAYOUT, codec=b)
    with pytest.raises(CorruptObject):  # same profile, other level: the chunk header names the codec
        decode_chunk(obj, key="k", layout=LAYOUT, codec=get_codec("cachegen-high", LAYOUT, profile=profile))


def test_without_profile_clear_error():
    codec = get_codec("cachegen-default", LAYOUT)
    assert not codec.lossless and codec.meta() == b""
    with pytest.raises(InvalidInput, match="kdnctl codec profile"):
        codec.encode(synthetic_kv(8, 1))
    with pytest.raises(InvalidInput):
        get_codec("cachegen-default", KVLayout("x", 2, 2, 16), profile=build_profile(
            [synthetic_kv(16, 1)], model_id="toy"))
    assert {"cachegen-high", "cachegen-default", "cachegen-compact", "lossless"} <= set(available_codecs())


@pytest.mark.parametrize("level", ["default"])
def test_damaged_sections_never_crash(profile, level):
    """Bit flips and truncations: CorruptStream or (undetectable damage) a tensor of the right shape."""
    codec = get_codec(f"cachegen-{level}", LAYOUT, profile=profile)
    kv = synthetic_kv(48, 17)
    data = codec.encode(kv)
    rng = random.Random(5)
    detected = 0
    for i in range(120):
        m = bytearray(data)
        if i % 4 == 0:
            m = m[:rng.randrange(len(m))]
        else:
            pos = rng.randrange(len(m))
            m[pos] ^= 1 << rng.randrange(8)
        try:
            out = codec.decode(bytes(m), 4, 48, meta=codec.meta())
            assert out.shape == kv.shape
        except CorruptStream:
            detected += 1
    assert detected >= 60
    for bad_meta in (b"", b"CG\x01" + b"\0" * 16, b"xx"):
        with pytest.raises(CorruptStream):
            codec.decode(data, 4, 48, meta=bad_meta)
    with pytest.raises(CorruptStream):
        codec.decode(data, 4, 47, meta=codec.meta())


def test_statistics_of_real_shape():
    """A profile built from KV with many layers sets per-layer steps and sink thresholds."""
    layout = KVLayout("toy-deep", 6, 1, 8)
    xs = [synthetic_kv(64, s, layout) for s in range(2)]
    prof = build_profile(xs, model_id="toy-deep", importance=np.linspace(1, 100, 6 * 2 * 8).reshape(6, 2, 8))
    steps = prof.levels["default"].step
    assert steps.shape == (6, 2, 8) and steps[0, 0, 0] > steps[-1, -1, -1]  # more important, finer
    assert np.all(prof.sink_ratio > 0)


def _rope(k: torch.Tensor, start: int, inv_freq: np.ndarray) -> torch.Tensor:
    """Rotate-half RoPE of keys ``[L, T, H, D]`` at positions ``start ..``."""
    half = k.shape[-1] // 2
    angle = torch.arange(start, start + k.shape[1], dtype=torch.float64)[:, None] * torch.from_numpy(inv_freq)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = k[..., :half].double(), k[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).float()


def test_rope_augmented_profile_is_position_independent():
    """Keys are stored after RoPE: a profile of short samples must still code keys at position 5000 well."""
    inv_freq = 1e4 ** (-np.arange(0, 16, 2) / 16)

    def at(start: int, seed: int) -> torch.Tensor:
        kv = synthetic_kv(256, seed).float()
        kv[:, 0] = _rope(kv[:, 0] + 3.0, start, inv_freq)  # keys with a large mean, as real models have
        return kv.to(torch.bfloat16)

    samples = [at(0, s) for s in range(3)]
    near, far = at(0, 20), at(5000, 21)
    ratios = {}
    for rope in (None, (inv_freq, 8192)):
        prof = build_profile(samples, model_id="toy", rope=rope, levels={"default": 0.7})
        codec = get_codec("cachegen-default", LAYOUT, profile=prof)
        ratios[rope is not None] = [near.numel() * 2 / len(codec.encode(x)) for x in (near, far)]
    assert ratios[True][1] > 0.9 * ratios[True][0]
    assert ratios[True][1] > 1.2 * ratios[False][1]


def _golden_profile() -> ModelProfile:
    """A hand-written profile (no fitting, no LAPACK), so the bytes below depend only on the format."""
    from codec._rans import normalize_freqs
    from codec.profile import LevelProfile

    c = 32
    hadamard = np.array([[1]])
    while hadamard.shape[0] < c:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    transform = np.rint(hadamard / np.sqrt(c) * 2 ** 13).astype(np.int16)
    freq = normalize_freqs(np.exp(-np.abs(np.arange(18) - 9) / 2.0)).astype(np.uint16)
    level = LevelProfile(name="default", step_int=np.full((2, 2, c), 1000, np.uint16), step_shift=12,
                         table_of=np.zeros((2, 2, c), np.uint16), lo=np.array([-8], np.int16),
                         raw_bits=np.array([0], np.uint8), size=np.array([18], np.uint16), freq=freq[None])
    return ModelProfile(model_id="golden", num_layers=2, num_kv_heads=1, head_dim=32, stream_channels=32,
                        mean=np.linspace(-1, 1, 2 * 2 * c, dtype=np.float32).reshape(2, 2, c),
                        weight=np.ones((2, 2, c), np.float32), transform=np.broadcast_to(transform, (2, 2, 1, c, c)),
                        input_shift=16, sink_ratio=np.array([0.5, 0.0], np.float32), levels={"default": level})


def test_golden_bitstream():
    """Pins the version-1 bitstream: a GPU encoder must produce these bytes, a GPU decoder these values."""
    import hashlib

    layout = KVLayout("golden", 2, 1, 32, "bfloat16")
    codec = get_codec("cachegen-default", layout, profile=_golden_profile())
    n = np.arange(2 * 2 * 70 * 32)
    values = ((n * 7919) % 2001 - 1000) / 300.0
    kv = torch.from_numpy(values.astype(np.float32)).reshape(2, 2, 70, 1, 32).to(torch.bfloat16)
    kv[:, 1, 0] *= 0.01  # a sink in layer 0 (layer 1 has sink_ratio 0)
    data = codec.encode(kv)
    out = codec.decode(data, 2, 70, meta=codec.meta())
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN_SECTION
    assert hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest()[:16] == GOLDEN_VALUES


GOLDEN_SECTION = "68f2f240ce15b048"
GOLDEN_VALUES = "7bcbd7911df649ec"


@pytest.mark.parametrize("tokens", [2, 3, 255, 256])
def test_device_sink_flags_match_numpy_median(tokens):
    """The GPU encoder's sink flags (computed with torch, no host round trip) equal the CPU path's numpy rule."""
    from codec._gpu import sink_flags

    rng = np.random.default_rng(tokens)
    norms = rng.random((4, 6, tokens)) * rng.random((4, 6, 1))
    norms[..., 0] *= rng.random((4, 6)) * 0.6
    ratio = rng.random(6) * 0.6
    want = np.stack([n[:, 0] < ratio * np.median(n, axis=1) for n in norms])
    got = sink_flags(torch.from_numpy(norms), torch.from_numpy(ratio)).numpy()
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


def test_default_transform_group():
    """All channels up to 256 (SmolLM2's 192), else one KV head (Llama-3-8B: 128 of 1024), else a divisor."""
    from codec.profile import default_stream_channels

    assert default_stream_channels(192, 64) == 192
    assert default_stream_channels(1024, 128) == 128
    assert default_stream_channels(600, 300) == 200
    kv = torch.randn(2, 2, 40, 4, 96)  # 384 channels in heads of 96
    assert build_profile([kv], model_id="wide").stream_channels == 96
    assert build_profile([kv], model_id="wide", stream_channels=192).stream_channels == 192
