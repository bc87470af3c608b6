"""The recompute ratio (CacheBlend §5): recompute as much as loading hides, and never less than 15 %.

With layer-wise pipelining, recomputing ``r`` of the tokens costs ``r * prefill_s`` and runs while the next layers'
KV loads, so any ``r`` with ``r * prefill_s <= load_s`` is free: ``r = max(floor, load_s / prefill_s)``, capped at 1.
``load_s`` comes from the tier the chunks were fetched from (measured, or estimated from bytes and throughput);
``prefill_s`` from a profile of the model (:func:`prefill_seconds`).
"""

from __future__ import annotations

import time

import torch

__all__ = ["MIN_RATIO", "TIER_GBPS", "choose_ratio", "load_seconds", "prefill_seconds"]

#: The empirical minimum of the paper (quality loss negligible at and above it).
MIN_RATIO = 0.15

#: Rough read throughput per tier (GB/s), for estimates before anything was measured.
TIER_GBPS = {"gpu": 500.0, "cpu": 20.0, "node": 3.0, "disk": 2.0, "redis": 1.0, "s3": 0.3}

_PROFILE: dict[tuple, float] = {}


def choose_ratio(prefill_s: float, load_s: float, floor: float = MIN_RATIO) -> float:
    """``r`` where recompute time equals load time (``load_s / prefill_s``), at least ``floor``, at most 1."""
    if prefill_s <= 0:
        return 1.0
    return min(1.0, max(floor, load_s / prefill_s))


def load_seconds(num_bytes: int, tier: str | None = None, gbps: float | None = None) -> float:
    """Seconds to read ``num_bytes`` from ``tier`` (:data:`TIER_GBPS`) or at ``gbps``."""
    rate = gbps if gbps is not None else TIER_GBPS.get(tier or "node", TIER_GBPS["node"])
    return num_bytes / (rate * 1e9)


@torch.no_grad()
def prefill_seconds(model, num_tokens: int, probe_tokens: int = 256) -> float:
    """Estimated prefill seconds of ``num_tokens`` tokens: one timed forward of ``probe_tokens`` per model and
    device (cached), scaled linearly (prefill is dominated by the linear layers at these lengths)."""
    key = (id(model), str(model.device), probe_tokens)
    if key not in _PROFILE:
        ids = torch.zeros((1, probe_tokens), dtype=torch.long, device=model.device)
        model(input_ids=ids, use_cache=False)  # warm-up
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        _PROFILE[key] = (time.perf_counter() - t0) / probe_tokens
    return _PROFILE[key] * num_tokens
