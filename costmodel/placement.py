"""Cost-driven placement of stored chunks: pure functions a controller calls (no I/O, no clocks).

The rule (docs/costmodel.md, "Placement"): a chunk kept in tier ``t`` is worth, per hour,

    value_t = rate · saving_t − hold_t
    saving_t = C_gpu · (prefill_s − load_stall · load_t) / 3600 − fetch_t     ($ per reuse served from t)
    hold_t   = GB · per_gb_hour_t                                              ($ per hour kept in t)

A tier is *eligible* when loading from it beats recomputing (``load_t < prefill_s``) and meets the chunk's
latency need (``load_t ≤ max_load_s``). :func:`choose_tier` picks the eligible tier with the largest positive
value, or ``None`` (recompute instead of keeping). Faster tiers save more per reuse and cost more per hour, so
the choice moves to faster tiers as the rate grows, never to slower ones. :func:`eviction_score` is value per GB
per hour: evict or demote the lowest first. Provisioned links are fixed per link, not per chunk, so placement
ignores ``link_per_hour``.

The rate is an exponentially decayed count (:func:`record_access`, :func:`current_rate`): for a steady stream
of λ accesses per hour its expectation is λ, and it halves every ``half_life_s`` without accesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from costmodel.catalog import Catalog, TierOffer
from costmodel.errors import InvalidInput

__all__ = [
    "ChunkStats", "PlacementPolicy", "TierValue",
    "current_rate", "record_access", "tier_values", "rank_tiers", "choose_tier", "eviction_score", "explain",
]


@dataclass(frozen=True)
class ChunkStats:
    """What the controller knows about one stored chunk."""

    size_bytes: int
    """Stored (compressed) object size."""
    reuse_per_hour: float
    """Decayed access-rate estimate as of ``last_access_s`` (see :func:`record_access`)."""
    prefill_seconds_saved: float
    """GPU seconds a hit saves, e.g. ``timing.prefill_seconds(compute, chunk_tokens, n_past=position)``."""
    last_access_s: float = 0.0
    """Time of the last access, in the same clock as ``now_s`` (any monotonic seconds)."""
    max_load_s: float | None = None
    """Latency need: a tier must deliver the chunk within this; ``None``: it only has to beat recomputing."""
    objects: int = 1
    """Object requests per fetch (request fees)."""

    def __post_init__(self) -> None:
        if isinstance(self.size_bytes, bool) or not isinstance(self.size_bytes, int) or self.size_bytes <= 0:
            raise InvalidInput(f"size_bytes must be a positive integer, got {self.size_bytes!r}")
        for name in ("reuse_per_hour", "prefill_seconds_saved", "last_access_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_load_s is not None and not self.max_load_s > 0:
            raise InvalidInput(f"max_load_s must be > 0, got {self.max_load_s!r}")
        if not isinstance(self.objects, int) or self.objects < 1:
            raise InvalidInput(f"objects must be an integer >= 1, got {self.objects!r}")


@dataclass(frozen=True)
class PlacementPolicy:
    """The prices and knobs placement needs beyond the tiers."""

    gpu_price_per_hour: float
    load_stall: float = 1.0
    """Fraction of the load time the GPU waits, charged at the GPU price."""
    half_life_s: float = 3600.0
    """Half-life of the decayed access rate."""
    min_value_per_hour: float = 0.0
    """A tier must be worth more than this ($/h) to keep the chunk (hysteresis against flapping)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gpu_price_per_hour) and self.gpu_price_per_hour >= 0):
            raise InvalidInput(f"gpu_price_per_hour must be >= 0, got {self.gpu_price_per_hour!r}")
        if not 0 <= self.load_stall <= 1:
            raise InvalidInput(f"load_stall must be in [0, 1], got {self.load_stall!r}")
        if not self.half_life_s > 0:
            raise InvalidInput(f"half_life_s must be > 0, got {self.half_life_s!r}")

    @classmethod
    def from_catalog(cls, catalog: Catalog, gpu: str | None = None, **kwargs: Any) -> PlacementPolicy:
        """A policy priced with ``gpu`` (default: the catalog's default GPU)."""
        return cls(gpu_price_per_hour=catalog.gpu(gpu).price_per_hour, **kwargs)


@dataclass(frozen=True)
class TierValue:
    """Why a tier is or is not a good home for a chunk (the numbers behind ``kdnctl inspect``)."""

    tier: str
    eligible: bool
    reason: str
    load_s: float
    saving_per_reuse: float
    hold_per_hour: float
    value_per_hour: float


def _tau_hours(half_life_s: float) -> float:
    return half_life_s / math.log(2) / 3600.0


def current_rate(stats: ChunkStats, now_s: float | None, half_life_s: float = 3600.0) -> float:
    """The rate estimate decayed from ``last_access_s`` to ``now_s`` (unchanged if ``now_s`` is None)."""
    if now_s is None:
        return stats.reuse_per_hour
    idle_h = max(now_s - stats.last_access_s, 0.0) / 3600.0
    return stats.reuse_per_hour * math.exp(-idle_h / _tau_hours(half_life_s))


def record_access(stats: ChunkStats, now_s: float, half_life_s: float = 3600.0) -> ChunkStats:
    """``stats`` after one access at ``now_s``: ``rate ← rate · e^(−Δ/τ) + 1/τ``, with ``τ = half_life / ln 2``."""
    rate = current_rate(stats, now_s, half_life_s) + 1.0 / _tau_hours(half_life_s)
    return replace(stats, reuse_per_hour=rate, last_access_s=max(now_s, stats.last_access_s))


def _value(stats: ChunkStats, tier: TierOffer, policy: PlacementPolicy, rate: float) -> TierValue:
    gb = stats.size_bytes / 1e9
    load = tier.latency_s + gb / tier.bandwidth_gbps
    fetch = gb * tier.egress_per_gb + stats.objects * tier.get_fee
    saving = policy.gpu_price_per_hour * (stats.prefill_seconds_saved - policy.load_stall * load) / 3600.0 - fetch
    hold = gb * tier.per_gb_hour
    value = rate * saving - hold
    if load >= stats.prefill_seconds_saved:
        reason, eligible = "loading is slower than recomputing", False
    elif stats.max_load_s is not None and load > stats.max_load_s:
        reason, eligible = f"load {load:.3g}s exceeds the latency need {stats.max_load_s:.3g}s", False
    elif value <= policy.min_value_per_hour:
        reason, eligible = "costs more to keep than it saves at this rate", True
    else:
        reason, eligible = "pays", True
    return TierValue(tier.name, eligible, reason, load, saving, hold, value)


def tier_values(stats: ChunkStats, tiers: list[TierOffer], policy: PlacementPolicy,
                now_s: float | None = None) -> list[TierValue]:
    """Every tier's value for ``stats``, in the order given."""
    rate = current_rate(stats, now_s, policy.half_life_s)
    return [_value(stats, t, policy, rate) for t in tiers]


def rank_tiers(stats: ChunkStats, tiers: list[TierOffer], policy: PlacementPolicy,
               now_s: float | None = None) -> list[TierValue]:
    """The tiers worth keeping the chunk in, best first (fall back down this list when a tier is full)."""
    values = [v for v in tier_values(stats, tiers, policy, now_s)
              if v.eligible and v.value_per_hour > policy.min_value_per_hour]
    return sorted(values, key=lambda v: (-v.value_per_hour, v.load_s))


def choose_tier(stats: ChunkStats, tiers: list[TierOffer], policy: PlacementPolicy,
                now_s: float | None = None) -> str | None:
    """The best tier's name, or ``None`` when no tier is worth keeping the chunk in."""
    ranked = rank_tiers(stats, tiers, policy, now_s)
    return ranked[0].tier if ranked else None


def eviction_score(stats: ChunkStats, tier: TierOffer, policy: PlacementPolicy, now_s: float | None = None) -> float:
    """Value per GB per hour of keeping the chunk in ``tier``; lower = evict or demote first (< 0: costs money).

    A tier it cannot usefully be served from (slower than recompute, misses the latency need) scores ``-inf``.
    """
    value = _value(stats, tier, policy, current_rate(stats, now_s, policy.half_life_s))
    if not value.eligible:
        return -math.inf
    return value.value_per_hour / (stats.size_bytes / 1e9)


def explain(stats: ChunkStats, tiers: list[TierOffer], policy: PlacementPolicy,
            now_s: float | None = None) -> dict[str, Any]:
    """A JSON-ready account of the decision: rate used, chosen tier, and each tier's numbers."""
    return {
        "reuse_per_hour": current_rate(stats, now_s, policy.half_life_s),
        "size_bytes": stats.size_bytes,
        "prefill_seconds_saved": stats.prefill_seconds_saved,
        "gpu_price_per_hour": policy.gpu_price_per_hour,
        "choice": choose_tier(stats, tiers, policy, now_s),
        "tiers": [v.__dict__ for v in tier_values(stats, tiers, policy, now_s)],
    }
