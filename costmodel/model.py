"""The cost model of arXiv 2503.14647, extended with per-GB and per-request fees (equations: docs/costmodel.md).

A context of ``c`` tokens is used by ``N = reuse_per_hour × retention_hours`` requests during the retention period
``T``; each adds ``p`` prompt tokens and generates ``o`` tokens. With ``P`` and ``D`` the GPU hours of prefill and
decode and ``C_gpu`` the GPU's price per hour::

    C_text = C_gpu · N · [P(c + p) + D(o)]
    C_kv   = C_gpu · [P(c) + N · (P(p | c) + D(o))]                  one prefill of the context, N short ones
           + (N − 1) · (fetch + stall)                                 each reuse fetches the KV
           + hold · T + store                                          keep it for T, write it once

    hold  = GB · per_gb_hour + link_per_hour (+ link_per_gbps_hour · GB / SLO)
    fetch = GB · egress_per_gb + objects · get_fee;  store = GB · egress_per_gb + objects · put_fee
    stall = C_gpu · load_stall · T_load,  T_load = latency + GB / bandwidth (+ raw GB / codec decode GB/s)

``GB`` is the stored (compressed) size. ``stall`` charges the GPU time an engine waits for the load
(``load_stall = 0`` gives the paper's model exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from costmodel.catalog import TierOffer
from costmodel.errors import InvalidInput
from costmodel.timing import Compute, decode_seconds, load_seconds, prefill_seconds

__all__ = [
    "Workload", "TierResult", "Analysis",
    "text_cost", "kv_cost", "cost_ratio", "paper_ratio", "break_even_reuse_per_hour", "delay_saved_seconds",
    "prefill_saved_seconds", "recompute_cost_per_request", "evaluate_tier", "analyze", "at_rate",
]

_H = 3600.0


@dataclass(frozen=True)
class Workload:
    """How one context is used."""

    context_tokens: int
    reuse_per_hour: float
    """Requests per hour that use the context (the paper's N / T); the first one creates the KV."""
    prompt_tokens: int = 32
    output_tokens: int = 32
    retention_hours: float = 1.0
    """The period T the KV is kept for."""
    compression_ratio: float = 1.0
    """Raw KV bytes / stored bytes (the codec's ratio; 1 = raw)."""
    chunk_tokens: int = 256
    """Tokens per stored object (request fees are per object)."""
    load_stall: float = 1.0
    """Fraction of the load time the GPU waits, charged at the GPU price (0 = fully overlapped, the paper)."""
    codec_decode_gbps: float | None = None
    """Decode speed of the codec in GB/s of raw KV, added to the load time; None = free."""
    slo_s: float | None = None
    """TTFT target; sizes a provisioned link as stored GB / SLO when tiers have ``link_per_gbps_hour``."""

    def __post_init__(self) -> None:
        for name in ("context_tokens", "prompt_tokens", "output_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"{name} must be an integer >= 0, got {value!r}")
        if self.context_tokens == 0 or self.chunk_tokens == 0:
            raise InvalidInput("context_tokens and chunk_tokens must be > 0")
        for name in ("reuse_per_hour", "retention_hours", "compression_ratio", "load_stall"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")
        if self.retention_hours <= 0 or self.compression_ratio <= 0:
            raise InvalidInput("retention_hours and compression_ratio must be > 0")
        if self.load_stall > 1:
            raise InvalidInput(f"load_stall must be in [0, 1], got {self.load_stall}")
        for name in ("codec_decode_gbps", "slo_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidInput(f"{name} must be > 0, got {value!r}")

    @property
    def requests(self) -> float:
        """N: requests that use the context during the retention period."""
        return self.reuse_per_hour * self.retention_hours

    @property
    def objects(self) -> int:
        """Stored objects (chunks) per context."""
        return math.ceil(self.context_tokens / self.chunk_tokens)


def _gb(compute: Compute, w: Workload) -> tuple[float, float]:
    raw = compute.model.kv_bytes(w.context_tokens) / 1e9
    return raw, raw / w.compression_ratio


def prefill_saved_seconds(compute: Compute, w: Workload) -> float:
    """GPU seconds a hit saves: ``P(c + p) − P(p | c)`` (= ``P(c)``: both time models are additive)."""
    c, p = w.context_tokens, w.prompt_tokens
    return prefill_seconds(compute, c + p) - prefill_seconds(compute, p, c)


def recompute_cost_per_request(compute: Compute, w: Workload) -> float:
    """$ of recomputing the context's prefill for one request."""
    return compute.gpu.price_per_hour * prefill_saved_seconds(compute, w) / _H


def _load_time(compute: Compute, w: Workload, tier: TierOffer) -> float:
    raw, stored = _gb(compute, w)
    extra = raw / w.codec_decode_gbps if w.codec_decode_gbps else 0.0
    return load_seconds(tier, stored * 1e9) + extra


def delay_saved_seconds(compute: Compute, w: Workload, tier: TierOffer) -> float:
    """TTFT saved per reuse: prefill time saved minus the load time from ``tier`` (negative: loading is slower)."""
    return prefill_saved_seconds(compute, w) - _load_time(compute, w, tier)


def _tier_terms(compute: Compute, w: Workload, tier: TierOffer) -> tuple[float, float, float, float]:
    """(hold $/h, fetch $/reuse, stall $/reuse, store $ once)."""
    _, gb = _gb(compute, w)
    hold = gb * tier.per_gb_hour + tier.link_per_hour
    if w.slo_s and tier.link_per_gbps_hour:
        hold += tier.link_per_gbps_hour * gb / w.slo_s
    fetch = gb * tier.egress_per_gb + w.objects * tier.get_fee
    stall = compute.gpu.price_per_hour * w.load_stall * _load_time(compute, w, tier) / _H
    store = gb * tier.egress_per_gb + w.objects * tier.put_fee
    return hold, fetch, stall, store


def text_cost(compute: Compute, w: Workload) -> float:
    """``C_text``: $ over the retention period when every request prefills context + prompt from text."""
    c, p, o = w.context_tokens, w.prompt_tokens, w.output_tokens
    per_request = prefill_seconds(compute, c + p) + decode_seconds(compute, o, c + p)
    return compute.gpu.price_per_hour * w.requests * per_request / _H


def kv_cost(compute: Compute, w: Workload, tier: TierOffer) -> float:
    """``C_kv``: $ over the retention period when the context's KV is computed once and kept in ``tier``."""
    c, p, o = w.context_tokens, w.prompt_tokens, w.output_tokens
    per_request = prefill_seconds(compute, p, c) + decode_seconds(compute, o, c + p)
    gpu_s = prefill_seconds(compute, c) + w.requests * per_request
    hold, fetch, stall, store = _tier_terms(compute, w, tier)
    reuses = max(w.requests - 1.0, 0.0)
    return compute.gpu.price_per_hour * gpu_s / _H + reuses * (fetch + stall) + hold * w.retention_hours + store


def cost_ratio(compute: Compute, w: Workload, tier: TierOffer) -> float:
    """``C_text / C_kv`` (> 1: keeping the KV is cheaper)."""
    kv = kv_cost(compute, w, tier)
    return text_cost(compute, w) / kv if kv > 0 else math.inf


def paper_ratio(compute: Compute, w: Workload) -> float:
    """The paper's approximation ``1 + ((N−1)/N) · P(c) / (D(o) + P(p))`` (no storage or network cost)."""
    n = w.requests
    if n <= 0:
        return 1.0
    c, p, o = w.context_tokens, w.prompt_tokens, w.output_tokens
    denom = decode_seconds(compute, o, c + p) + prefill_seconds(compute, p, c)
    if denom <= 0:
        return math.inf
    return 1.0 + (n - 1.0) / n * prefill_seconds(compute, c) / denom


def break_even_reuse_per_hour(compute: Compute, w: Workload, tier: TierOffer, *, steady: bool = False) -> float:
    """Reuse rate above which keeping the KV in ``tier`` is cheaper than recomputing (``inf``: never).

    From ``C_text = C_kv`` with ``S`` = recompute $/request and ``u`` = fetch + stall $/reuse:
    ``N* = (S − u + hold·T + store) / (S − u)``, rate ``N*/T``. With ``steady=True`` the KV already exists (its
    prefill and store are sunk), so the rate is the marginal ``hold / (S − u)``, as placement uses it.
    Never pays when loading is slower than recomputing (``delay_saved ≤ 0``).
    """
    if delay_saved_seconds(compute, w, tier) <= 0:
        return math.inf
    hold, fetch, stall, store = _tier_terms(compute, w, tier)
    net = recompute_cost_per_request(compute, w) - fetch - stall
    if net <= 0:
        return math.inf
    if steady:
        return hold / net
    t = w.retention_hours
    return (net + hold * t + store) / net / t


@dataclass(frozen=True)
class TierResult:
    """The numbers for keeping one context in one tier."""

    tier: str
    kind: str
    stored_gb: float
    load_s: float
    delay_saved_s: float
    hold_per_hour: float
    fetch_per_reuse: float
    stall_per_reuse: float
    store_once: float
    cost_per_reuse: float
    """fetch + stall + hold / rate: what each reuse costs when served from this tier (inf at rate 0)."""
    saving_per_reuse: float
    """recompute $/request − fetch − stall."""
    break_even_per_hour: float
    break_even_steady_per_hour: float
    kv_cost_per_hour: float
    ratio: float
    net_saving_per_hour: float
    """(C_text − C_kv) / T; > 0 when keeping the KV here pays."""
    verdict: str


@dataclass(frozen=True)
class Analysis:
    """Everything the calculator reports for one context."""

    compute: Compute
    workload: Workload
    kv_bytes: int
    stored_bytes: float
    prefill_s: float
    decode_s: float
    recompute_per_request: float
    text_cost_per_hour: float
    paper_ratio: float
    tiers: list[TierResult]
    best: str | None


def evaluate_tier(compute: Compute, w: Workload, tier: TierOffer) -> TierResult:
    """All numbers for ``tier``; ``verdict`` is ``pays``, ``below break-even`` or ``slower than recompute``."""
    raw, gb = _gb(compute, w)
    hold, fetch, stall, store = _tier_terms(compute, w, tier)
    delay = delay_saved_seconds(compute, w, tier)
    be = break_even_reuse_per_hour(compute, w, tier)
    kv = kv_cost(compute, w, tier)
    text = text_cost(compute, w)
    rate = w.reuse_per_hour
    if delay <= 0:
        verdict = "slower than recompute"
    elif rate > be:
        verdict = "pays"
    else:
        verdict = "below break-even"
    return TierResult(
        tier=tier.name, kind=tier.kind, stored_gb=gb, load_s=_load_time(compute, w, tier), delay_saved_s=delay,
        hold_per_hour=hold, fetch_per_reuse=fetch, stall_per_reuse=stall, store_once=store,
        cost_per_reuse=fetch + stall + (hold / rate if rate > 0 else math.inf),
        saving_per_reuse=recompute_cost_per_request(compute, w) - fetch - stall,
        break_even_per_hour=be,
        break_even_steady_per_hour=break_even_reuse_per_hour(compute, w, tier, steady=True),
        kv_cost_per_hour=kv / w.retention_hours, ratio=text / kv if kv > 0 else math.inf,
        net_saving_per_hour=(text - kv) / w.retention_hours, verdict=verdict)


def analyze(compute: Compute, w: Workload, tiers: list[TierOffer]) -> Analysis:
    """Evaluate every tier; ``best`` is the paying tier with the largest net saving per hour, or ``None``."""
    if not tiers:
        raise InvalidInput("no tiers to evaluate")
    results = [evaluate_tier(compute, w, t) for t in tiers]
    paying = [r for r in results if r.verdict == "pays"]
    best = max(paying, key=lambda r: r.net_saving_per_hour).tier if paying else None
    c, p, o = w.context_tokens, w.prompt_tokens, w.output_tokens
    raw, gb = _gb(compute, w)
    return Analysis(
        compute=compute, workload=w, kv_bytes=compute.model.kv_bytes(c), stored_bytes=gb * 1e9,
        prefill_s=prefill_seconds(compute, c), decode_s=decode_seconds(compute, o, c + p),
        recompute_per_request=recompute_cost_per_request(compute, w),
        text_cost_per_hour=text_cost(compute, w) / w.retention_hours, paper_ratio=paper_ratio(compute, w),
        tiers=results, best=best)


def at_rate(w: Workload, reuse_per_hour: float) -> Workload:
    """``w`` with another reuse rate (for sweeps and plots)."""
    return replace(w, reuse_per_hour=reuse_per_hour)
