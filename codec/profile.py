"""Model profiles for the CacheGen codec: statistics and rANS tables built once per model, never per chunk.

``build_profile(samples, ...)`` builds a :class:`ModelProfile` from sample KV (tensors
``[layers, 2, tokens, kv_heads, head_dim]``, each starting at position 0 of a text), optionally with per-channel
importance (diagonal Fisher information of the model's output w.r.t. each KV channel). ``profile_model(model, texts)``
runs a Hugging Face causal LM over sample texts to get both, and is what ``kdnctl codec profile --model PATH`` calls.

How a level's step is chosen, per layer ``l``, keys/values ``kv``, channel ``c`` and transform coefficient ``j``::

    weight = importance ** 0.5     (with importance; otherwise 1 / the channel's standard deviation)
    weight *= 1 / geomean(std * weight)           # a typical channel's weighted std is 1: alpha is in its units
    y = KLT((x - mean) * weight)                  # per (layer, kv, group of channels)
    step[j] = min(alpha_level, cap_level * std(y[j]))   # a coefficient never gets a step coarser than cap * its std

With Fisher importance this spreads the expected output error evenly over all channels (the rate-distortion
optimum for uniform quantizers with entropy coding): channels the model barely reads get coarse steps, shallow
sensitive layers fine ones. Tables: channels are grouped by the spread of their integer levels (half-octave
classes, separately for keys and values); each class gets one table. See docs/codec.md for measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from codec._profile_format import LevelProfile, ModelProfile
from codec._rans import M, normalize_freqs
from codec.cachegen import INPUT_BITS, TRANSFORM_BITS, TRANSFORM_ONE
from codec.errors import InvalidInput

__all__ = ["ModelProfile", "LevelProfile", "build_profile", "profile_model", "DEFAULT_LEVELS", "load_profile"]

#: alpha (step in units of a typical channel's std) per level, or ``(alpha, cap)``; the cap (in a coefficient's
#: std, default ``DEFAULT_CAP``) bounds its step. ``compact`` takes a looser cap: at ~10x, coefficients with a
#: small spread are better dropped (coded as zero) than kept at 2 std; measured in docs/codec.md.
DEFAULT_LEVELS: dict[str, float | tuple[float, float]] = {"high": 0.15, "default": 0.7, "compact": (1.8, 4.0)}
DEFAULT_CAP = 2.0
_MAX_ALPHABET = 256
_TAIL = 1e-4


def load_profile(path: str | Path) -> ModelProfile:
    """Read a profile written by :meth:`ModelProfile.save`."""
    return ModelProfile.load(path)


def _stack(samples: Sequence, num_layers: int | None) -> list[np.ndarray]:
    out = []
    for s in samples:
        a = s.detach().float().cpu().numpy() if hasattr(s, "detach") else np.asarray(s, dtype=np.float32)
        if a.ndim != 5 or a.shape[1] != 2:
            raise InvalidInput("profile samples must be [layers, 2, tokens, kv_heads, head_dim]")
        if num_layers is not None and a.shape[0] != num_layers:
            raise InvalidInput("profile samples disagree on the number of layers")
        num_layers = a.shape[0]
        out.append(a.reshape(a.shape[0], 2, a.shape[2], -1).astype(np.float32))
    if not out:
        raise InvalidInput("build_profile needs at least one KV sample")
    return out


def _sink_ratio(xs: list[np.ndarray]) -> np.ndarray:
    """Per layer: ``min(0.5, 2 r0)`` where ``r0`` is token 0's value norm over the median; 0 if ``r0 >= 0.5``."""
    r0 = []
    for x in xs:
        n = np.sqrt(np.sum(x[:, 1].astype(np.float64) ** 2, axis=-1))
        r0.append(n[:, 0] / np.median(n, axis=1))
    r = np.max(np.stack(r0), axis=0)
    return np.where(r < 0.5, np.minimum(0.5, 2 * r), 0.0).astype(np.float32)


def _tables(zs: np.ndarray, chan_spread: np.ndarray, kv_index: np.ndarray):
    """Tables for integer levels ``zs[L, 2, N, C]``: returns table_of [L, 2, C] and per-table arrays."""
    cls = np.clip(np.round(2 * np.log2(np.maximum(chan_spread, 1e-3))), -16, 40).astype(np.int64)
    key = kv_index * 100 + cls
    uniq = np.unique(key)
    table_of = np.zeros(key.shape, dtype=np.int64)
    los, bits, sizes, freqs = [], [], [], []
    for i, k in enumerate(uniq):
        members = key == k
        table_of[members] = i
        z = zs.transpose(0, 1, 3, 2)[members].reshape(-1)
        r = float(np.median(chan_spread[members]))
        b = int(max(0, np.floor(np.log2(max(r, 1e-9) / 4.0))))
        u = z >> b
        lo, hi = (int(v) for v in np.quantile(u, [_TAIL, 1 - _TAIL], method="nearest"))
        if hi - lo + 2 > _MAX_ALPHABET:
            mid = int(np.median(u))
            lo, hi = mid - (_MAX_ALPHABET - 2) // 2, mid + (_MAX_ALPHABET - 2) // 2 - 1
        counts = np.bincount(np.clip(u - lo + 1, 0, hi - lo + 2), minlength=hi - lo + 3).astype(np.float64)
        escapes = counts[0] + counts[-1]
        counts = counts[:-1]
        counts[0] = escapes
        counts += 0.02 * counts.sum() / counts.size  # keep every symbol codable at a sane cost
        los.append(lo)
        bits.append(b)
        sizes.append(counts.size)
        freqs.append(normalize_freqs(counts, M))
    return table_of, los, bits, sizes, freqs


def _subsample(x: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced tokens of ``x[L, 2, N, C]``."""
    n = x.shape[2]
    return x if n <= limit else x[:, :, np.linspace(0, n - 1, limit).astype(np.int64)]


def _klt(w: np.ndarray, group: int) -> np.ndarray:
    """Orthonormal KLT per (layer, kv, channel group) of ``w[L, 2, N, C]`` as int16 ``[L, 2, C/G, G, G] * 2**13``."""
    num_layers, _, n, c = w.shape
    blocks = w.reshape(num_layers, 2, n, c // group, group).transpose(0, 1, 3, 2, 4).astype(np.float64)
    cov = np.einsum("lkgni,lkgnj->lkgij", blocks, blocks) / n
    _, vec = np.linalg.eigh(cov)
    vec = vec[..., ::-1]  # largest variance first
    sign = np.sign(np.take_along_axis(vec, np.abs(vec).argmax(axis=-2)[..., None, :], axis=-2))
    return np.rint(vec * np.where(sign == 0, 1, sign) * TRANSFORM_ONE).astype(np.int16)


def _coefficients(x: np.ndarray, mean: np.ndarray, weight: np.ndarray, transform: np.ndarray,
                  shift: int) -> np.ndarray:
    """Transform coefficients (float64, units of the weighted input) of ``x[L, 2, N, C]``, as the codec does."""
    from codec.cachegen import forward_transform

    fixed = forward_transform(x, mean, weight, transform, shift)
    return fixed * 2.0 ** -(shift + TRANSFORM_BITS)


def _level(name: str, y: np.ndarray, alpha: float, cap: float) -> LevelProfile:
    ysd = np.maximum(y.std(axis=2), 1e-9)
    step = np.minimum(alpha, cap * ysd)
    shift = int(np.clip(11 - np.ceil(np.log2(step.max())), 0, 60))
    step_int = np.clip(np.rint(step * 2.0 ** shift), 1, (1 << 12) - 1).astype(np.uint16)
    z = np.rint(y / (step_int.astype(np.float64) * 2.0 ** -shift)[:, :, None]).astype(np.int64)
    kv_index = np.broadcast_to(np.arange(2)[None, :, None], step.shape)
    table_of, lo, bits, sizes, freqs = _tables(z, z.std(axis=2), kv_index)
    freq = np.zeros((len(freqs), max(sizes)), dtype=np.uint16)
    for i, f in enumerate(freqs):
        freq[i, :f.size] = f
    return LevelProfile(name=name, step_int=step_int, step_shift=shift, table_of=table_of.astype(np.uint16),
                        lo=np.array(lo, dtype=np.int16), raw_bits=np.array(bits, dtype=np.uint8),
                        size=np.array(sizes, dtype=np.uint16), freq=freq, info={"alpha": alpha, "cap": cap})


def _rope_shift(xs: list[np.ndarray], head_dim: int, inv_freq: np.ndarray, max_position: int,
                seed: int = 0) -> list[np.ndarray]:
    """Rotate every sample token's keys by RoPE for a random extra offset in ``[0, max_position)``.

    Keys are stored after RoPE, so their statistics depend on absolute position: a profile of short texts does not
    cover the angles that slowly rotating channel pairs reach at position 8K. Spreading each sample key over all
    positions makes the statistics position-independent. Pairs are ``(i, i + head_dim/2)`` (the rotate-half
    convention of Llama-family models in Hugging Face).
    """
    rng = np.random.default_rng(seed)
    half = head_dim // 2
    out = []
    for a in xs:
        num_layers, _, t, c = a.shape
        angle = rng.integers(0, max_position, size=t)[:, None] * np.asarray(inv_freq, np.float64)[None, :half]
        cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
        k = a[:, 0].reshape(num_layers, t, c // head_dim, head_dim).astype(np.float64)
        x1, x2 = k[..., :half], k[..., half:]
        rotated = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        b = a.copy()
        b[:, 0] = rotated.reshape(num_layers, t, c).astype(np.float32)
        b[:, 0, 0] = a[:, 0, 0]  # token 0 stays where it is (the sink is stored verbatim anyway)
        out.append(b)
    return out


def _center_keys(xs: list[np.ndarray], chunk: int) -> list[np.ndarray]:
    """Subtract from each ``chunk``-token piece of every sample its key mean (as the codec does per section)."""
    out = []
    for a in xs:
        b = a.copy()
        for s in range(0, a.shape[2], chunk):
            piece = a[:, 0, s:s + chunk]
            keys = piece[:, 1:] if piece.shape[1] > 1 else piece
            b[:, 0, s:s + chunk] -= keys.astype(np.float64).mean(axis=1, keepdims=True).astype(np.float32)
        out.append(b)
    return out


def default_stream_channels(channels: int, head_dim: int) -> int:
    """Channels per transform group when none is asked for: all of them up to 256 (SmolLM2: 3 heads, 192), else
    one KV head (Llama-3-8B: 128 of 1024), else the largest divisor <= 256.

    Decoding costs ``G`` float64 multiply-adds per value (the exact integer transform): on an H100 a 1 GiB cache
    decodes at 117.5 GB/s with ``G = 128`` and 89 GB/s with ``G = 256`` (the float64 GEMM: 3.3 vs 4.75 ms).
    Grouping more heads compresses a little better (SmolLM2: 3 heads vs 1 head, 0.15 bit/value of coding gain), so
    pass ``stream_channels`` explicitly where bytes matter more than decode speed.
    """
    if channels <= 256:
        return channels
    if head_dim <= 256 and channels % head_dim == 0:
        return head_dim
    return max(d for d in range(1, 257) if channels % d == 0)


def build_profile(samples: Sequence, *, model_id: str, importance: np.ndarray | None = None,
                  levels: dict[str, float | tuple[float, float]] | None = None, cap: float = DEFAULT_CAP,
                  transform: bool = True,
                  rope: tuple[np.ndarray, int] | None = None, chunk_key_mean: bool = True, chunk_tokens: int = 256,
                  stream_channels: int | None = None, max_tokens: int = 4096, info: dict | None = None) -> ModelProfile:
    """Build a profile from KV samples (see the module docstring); ``importance`` is ``[L, 2, C]`` if given.

    ``levels`` maps a level name to its alpha, or to ``(alpha, cap)`` for a level-specific cap (default ``cap``).

    ``rope = (inv_freq, max_position)`` makes the key statistics position-independent (see :func:`_rope_shift`);
    without it the profile is only good for positions like those of the samples. ``chunk_key_mean`` centres keys
    per section (``chunk_tokens`` is the chunk size the statistics assume).
    """
    xs = _stack(samples, None)
    num_layers, c = xs[0].shape[0], xs[0].shape[-1]
    head_dim = samples[0].shape[-1]
    sink = _sink_ratio(xs)
    if rope is not None:
        xs = _rope_shift(xs, head_dim, rope[0], int(rope[1]))
        if importance is not None:  # a rotating pair shares its importance
            imp = np.asarray(importance, dtype=np.float64).reshape(num_layers, 2, c // head_dim, 2, head_dim // 2)
            imp[:, 0] = imp[:, 0].mean(axis=2, keepdims=True)
            importance = imp.reshape(num_layers, 2, c)
    if chunk_key_mean:
        xs = _center_keys(xs, chunk_tokens)
    n = sum(a.shape[2] - 1 for a in xs)  # token 0 (the sink) is special-cased by the codec
    mean = (sum(a[:, :, 1:].sum(axis=2, dtype=np.float64) for a in xs) / n)
    var = sum(((a[:, :, 1:] - mean[:, :, None]) ** 2).sum(axis=2, dtype=np.float64) for a in xs) / n
    mean = mean.astype(np.float32)
    if chunk_key_mean:
        mean[:, 0] = 0
    std = np.maximum(np.sqrt(var), 1e-6)
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64).reshape(num_layers, 2, c)
        floor = np.quantile(importance[importance > 0], 0.001) if np.any(importance > 0) else 1.0
        weight = np.sqrt(np.maximum(importance, floor))
    else:
        weight = 1.0 / std
    weight = (weight / np.exp(np.mean(np.log(std * weight)))).astype(np.float32)  # typical weighted std = 1
    if stream_channels is None:
        stream_channels = default_stream_channels(c, head_dim)
    x = _subsample(np.concatenate([a[:, :, 1:] for a in xs], axis=2), max_tokens)
    w = (x - mean[:, :, None]) * weight[:, :, None]
    # headroom: 1024x the largest weighted value seen, ~2**-15 resolution or better for typical profiles
    shift = int(np.clip(INPUT_BITS - np.ceil(np.log2(max(float(np.abs(w).max()), 1e-6) * 1024)), 0, 40))
    if transform:
        tr = _klt(w, stream_channels)
    else:
        eye = np.eye(stream_channels, dtype=np.int16) * TRANSFORM_ONE
        tr = np.broadcast_to(eye, (num_layers, 2, c // stream_channels) + eye.shape).copy()
    y = _coefficients(x, mean, weight, tr, shift)
    lvls = {}
    for name, spec in (levels or DEFAULT_LEVELS).items():
        alpha, level_cap = spec if isinstance(spec, (tuple, list)) else (spec, cap)
        lvls[name] = _level(name, y, float(alpha), float(level_cap))
    prof = ModelProfile(model_id=model_id, num_layers=num_layers, num_kv_heads=c // head_dim, head_dim=head_dim,
                        stream_channels=stream_channels, mean=mean, weight=weight, transform=tr, input_shift=shift,
                        sink_ratio=sink, levels=lvls, chunk_key_mean=chunk_key_mean,
                        info=dict(info or {}, importance="fisher" if importance is not None else "std",
                                  transform="klt" if transform else "identity", samples=len(xs),
                                  rope_max_position=int(rope[1]) if rope is not None else 0,
                                  tokens=int(sum(a.shape[2] for a in xs))))
    prof.check()
    return prof


def profile_model(model, texts: Sequence[str], *, tokenizer=None, context: int = 1024, continuation: int = 256,
                  fisher_samples: int = 2, calibrate: int = 1, calibration_texts: int = 2,
                  calibration_tokens: int = 256,
                  levels: dict[str, float | tuple[float, float]] | None = None, transform: bool = True, seed: int = 0,
                  stream_channels: int | None = None, progress: Callable[[str], None] | None = None) -> ModelProfile:
    """Profile a Hugging Face causal LM (a loaded model, a model folder, or a ``.gguf`` file) on ``texts``.

    Each text gives one KV sample of its first ``context`` tokens. With ``fisher_samples > 0`` the next
    ``continuation`` tokens are teacher-forced on top of that cache to measure per-channel importance (diagonal
    Fisher). Then ``calibrate`` rounds rebalance layers: each (layer, K/V) is put through the ``default`` level
    alone on the first ``calibration_texts`` texts (``calibration_tokens`` of continuation), and its weight is scaled
    so that every (layer, K/V) adds the same output KL divergence (the equal-slope condition, since all have the
    same number of values). Calibration costs ``2 * layers`` forward passes per text and round.
    """
    from codec._hf import kv_and_fisher, load_model, rope_parameters, single_group_kl

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    model, tokenizer, model_id = load_model(model, tokenizer)
    rope = rope_parameters(model)
    samples, fishers, conts = [], [], []
    for i, text in enumerate(texts):
        kv, fisher, cont = kv_and_fisher(model, tokenizer, text, context=context, continuation=continuation,
                                         samples=fisher_samples, seed=seed + i)
        samples.append(kv)
        conts.append(cont)
        if fisher is not None:
            fishers.append(fisher)
        say(f"sample {i + 1}/{len(texts)}")
    importance = None
    if fishers:  # token 0 (the sink) is stored verbatim; the last tokens are over-weighted by recency
        trim = min(64, context // 8)
        importance = np.mean([f[:, :, 1:f.shape[2] - trim].mean(axis=2) for f in fishers], axis=0)
    info = {"texts": len(texts), "context": context, "continuation": continuation, "fisher_samples": fisher_samples,
            "calibrate": calibrate}
    prof = build_profile(samples, model_id=model_id, importance=importance, levels=levels, transform=transform,
                         rope=rope, info=info, stream_channels=stream_channels)
    for r in range(calibrate if importance is not None else 0):
        kl = np.mean([single_group_kl(model, prof, "default", kv, cont[:calibration_tokens])
                      for kv, cont in list(zip(samples, conts))[:calibration_texts]], axis=0)
        factor = np.clip(kl / np.exp(np.mean(np.log(np.maximum(kl, 1e-12)))), 1 / 16, 16)
        importance = importance * factor[:, :, None]
        prof = build_profile(samples, model_id=model_id, importance=importance, levels=levels, transform=transform,
                             rope=rope, info=dict(info, calibration_kl=float(kl.sum())),
                             stream_channels=stream_channels)
        say(f"calibration {r + 1}/{calibrate}: sum of per-layer KL {kl.sum():.3g}")
    return prof
