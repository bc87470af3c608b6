"""Placement: clear-cut choices, monotonicity, eviction order, the decayed rate."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel import (
    Catalog,
    ChunkStats,
    Compute,
    PlacementPolicy,
    TierOffer,
    choose_tier,
    current_rate,
    eviction_score,
    explain,
    get_model,
    prefill_seconds,
    rank_tiers,
    record_access,
)
from costmodel.errors import InvalidInput


@pytest.fixture()
def setup(catalog: Catalog) -> tuple[list[TierOffer], PlacementPolicy, ChunkStats]:
    """A 256-token llama-3-8b chunk deep in a 32K context, 4x compressed, on an H100."""
    gpu = catalog.gpu("h100")
    compute = Compute(get_model("llama-3-8b"), gpu)
    saved = prefill_seconds(compute, 256, n_past=32_000)
    size = get_model("llama-3-8b").kv_bytes(256) // 4
    stats = ChunkStats(size_bytes=size, reuse_per_hour=1.0, prefill_seconds_saved=saved)
    return catalog.tier_offers(gpu), PlacementPolicy.from_catalog(catalog, "h100"), stats


def test_hot_chunk_goes_to_gpu(setup) -> None:
    tiers, policy, stats = setup
    assert choose_tier(replace(stats, reuse_per_hour=1e5), tiers, policy) == "gpu"


def test_warm_chunk_goes_to_cpu(setup) -> None:
    tiers, policy, stats = setup
    assert choose_tier(replace(stats, reuse_per_hour=200), tiers, policy) == "cpu"


def test_cold_chunk_goes_to_a_cheap_tier_or_nowhere(setup) -> None:
    tiers, policy, stats = setup
    cool = choose_tier(replace(stats, reuse_per_hour=2), tiers, policy)
    assert cool in ("disk", "s3")
    assert choose_tier(replace(stats, reuse_per_hour=0.0), tiers, policy) is None
    assert choose_tier(replace(stats, reuse_per_hour=1e-4), tiers, policy) is None


def test_latency_need_excludes_slow_tiers(setup) -> None:
    tiers, policy, stats = setup
    cool = replace(stats, reuse_per_hour=2)
    assert choose_tier(replace(cool, max_load_s=1e-3), tiers, policy) == "cpu"
    assert choose_tier(replace(cool, max_load_s=1e-9), tiers, policy) is None
    # a chunk whose load from every tier is slower than recomputing it is never kept
    assert choose_tier(replace(cool, prefill_seconds_saved=1e-7, reuse_per_hour=1e6), tiers, policy) is None


def test_rank_and_explain(setup) -> None:
    tiers, policy, stats = setup
    warm = replace(stats, reuse_per_hour=200)
    ranked = rank_tiers(warm, tiers, policy)
    assert ranked[0].tier == "cpu"
    assert [v.value_per_hour for v in ranked] == sorted((v.value_per_hour for v in ranked), reverse=True)
    info = explain(warm, tiers, policy)
    assert info["choice"] == "cpu" and len(info["tiers"]) == len(tiers)
    assert {t["tier"] for t in info["tiers"]} == {t.name for t in tiers}


def test_eviction_score_orders_by_value_per_byte(setup) -> None:
    tiers, policy, stats = setup
    cpu = next(t for t in tiers if t.name == "cpu")
    hot, cold = replace(stats, reuse_per_hour=500), replace(stats, reuse_per_hour=1)
    assert eviction_score(cold, cpu, policy) < eviction_score(hot, cpu, policy)
    assert eviction_score(cold, cpu, policy) < 0 < eviction_score(hot, cpu, policy)
    big = replace(hot, size_bytes=hot.size_bytes * 4)  # same value spread over 4x the bytes
    assert eviction_score(big, cpu, policy) < eviction_score(hot, cpu, policy)
    # idle time decays the rate, so a long-idle chunk scores lower
    assert eviction_score(hot, cpu, policy, now_s=10 * 3600) < eviction_score(hot, cpu, policy, now_s=0)
    slow = TierOffer("tape", "s3", per_gb_hour=0, bandwidth_gbps=1e-6)
    assert eviction_score(hot, slow, policy) == -math.inf


def test_decayed_rate_tracks_a_steady_stream(setup) -> None:
    _, _, stats = setup
    s = replace(stats, reuse_per_hour=0.0)
    for i in range(1, 2001):  # 20 accesses per hour for 100 hours
        s = record_access(s, now_s=i * 180.0)
    assert s.reuse_per_hour == pytest.approx(20, rel=0.1)
    assert current_rate(s, s.last_access_s + 3600) == pytest.approx(s.reuse_per_hour / 2)
    assert current_rate(s, None) == s.reuse_per_hour


def test_bad_stats() -> None:
    with pytest.raises(InvalidInput):
        ChunkStats(size_bytes=0, reuse_per_hour=1, prefill_seconds_saved=1)
    with pytest.raises(InvalidInput):
        ChunkStats(size_bytes=10, reuse_per_hour=-1, prefill_seconds_saved=1)
    with pytest.raises(InvalidInput):
        PlacementPolicy(gpu_price_per_hour=1, load_stall=3)


_tier = st.builds(
    TierOffer, name=st.text("abcdefgh", min_size=1, max_size=6), kind=st.just("x"),
    per_gb_hour=st.floats(0, 1), bandwidth_gbps=st.floats(0.05, 2000), latency_s=st.floats(0, 0.05),
    get_fee=st.floats(0, 1e-5), egress_per_gb=st.floats(0, 0.1))


@settings(max_examples=150, deadline=None)
@given(tiers=st.lists(_tier, min_size=1, max_size=6), size=st.integers(10_000, 10**9),
       saved=st.floats(0.001, 10), r1=st.floats(0, 1e4), factor=st.floats(1, 100),
       price=st.floats(0.1, 20), stall=st.floats(0, 1))
def test_more_reuse_never_moves_to_a_slower_tier(tiers, size, saved, r1, factor, price, stall) -> None:
    policy = PlacementPolicy(gpu_price_per_hour=price, load_stall=stall)
    by_name = {t.name: t for t in tiers}
    tiers = list(by_name.values())
    lo = ChunkStats(size_bytes=size, reuse_per_hour=r1, prefill_seconds_saved=saved)
    hi = replace(lo, reuse_per_hour=r1 * factor)
    a, b = choose_tier(lo, tiers, policy), choose_tier(hi, tiers, policy)
    if a is None:
        return
    assert b is not None  # a chunk worth keeping stays worth keeping when used more
    values = {v.tier: v for v in rank_tiers(hi, tiers, policy)}
    lo_values = {v.tier: v for v in rank_tiers(lo, tiers, policy)}
    # the tier chosen at the higher rate saves at least as much per reuse (i.e. is as fast, fees alike)
    assert values[b].saving_per_reuse >= lo_values[a].saving_per_reuse - 1e-12
    if all(t.get_fee == tiers[0].get_fee and t.egress_per_gb == tiers[0].egress_per_gb for t in tiers) and stall > 0:
        assert values[b].load_s <= lo_values[a].load_s + 1e-12
