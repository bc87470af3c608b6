"""Analytical cloud-cost model of KV-cache reuse (arXiv 2503.14647; equations in docs/costmodel.md).

Layers, each a small module of plain functions over frozen dataclasses:

- :mod:`costmodel.shapes` - model shapes and KV bytes per token (``get_model``).
- :mod:`costmodel.catalog` - GPUs, throughput, tiers and networks from ``prices.yaml`` (``load_catalog``).
- :mod:`costmodel.timing` - GPU seconds of prefill/decode, load time from a tier.
- :mod:`costmodel.model` - ``C_text``, ``C_kv``, ratios, break-even rates, delay saved (``analyze``).
- :mod:`costmodel.placement` - per-chunk tier choice and eviction scores for the controller.
- :mod:`costmodel.cli` - the calculator (``kdnctl cost`` / ``python -m costmodel``).
"""

from costmodel.catalog import GPU, Catalog, Network, Throughput, TierOffer, load_catalog
from costmodel.model import (
    Analysis,
    TierResult,
    Workload,
    analyze,
    break_even_reuse_per_hour,
    cost_ratio,
    delay_saved_seconds,
    kv_cost,
    paper_ratio,
    text_cost,
)
from costmodel.placement import (
    ChunkStats,
    PlacementPolicy,
    TierValue,
    choose_tier,
    current_rate,
    eviction_score,
    explain,
    rank_tiers,
    record_access,
)
from costmodel.shapes import MODELS, ModelShape, get_model
from costmodel.timing import Compute, decode_seconds, load_seconds, prefill_seconds

__all__ = [
    "GPU", "Catalog", "Network", "Throughput", "TierOffer", "load_catalog",
    "Analysis", "TierResult", "Workload", "analyze", "break_even_reuse_per_hour", "cost_ratio",
    "delay_saved_seconds", "kv_cost", "paper_ratio", "text_cost",
    "ChunkStats", "PlacementPolicy", "TierValue", "choose_tier", "current_rate", "eviction_score", "explain",
    "rank_tiers", "record_access",
    "MODELS", "ModelShape", "get_model",
    "Compute", "decode_seconds", "load_seconds", "prefill_seconds",
]
