"""The pinned CPU pool tier: the shared conformance suite, mixed-layout eviction and leases."""

from __future__ import annotations

import random
import threading

import pytest

from kdn.config import TierSpec
from kdn.node.tiers import build_tier
from kdn.node.tiers.pinned import CHUNK_HEADER_ALLOWANCE, PinnedTier, PinnedTierConfig
from tests.tiers.conformance import TierConformance, make_key, make_object, object_size

torch = pytest.importorskip("torch")


class _LeakCheck:
    """Every tier a test made has no pins left afterwards (practice 11)."""

    @pytest.fixture(autouse=True)
    def _no_pins_left(self):
        self.made: list[PinnedTier] = []
        yield
        assert [t.outstanding_leases for t in self.made] == [0] * len(self.made)


class TestPinnedTier(_LeakCheck, TierConformance):
    """Slab pages for the suite's standard object size, variable pages for the rest; exact byte granularity so
    that the suite's capacities (e.g. three objects plus 10 bytes) hold exactly what they say."""

    def make_tier(self, capacity, tmp_path):
        fits = capacity >= object_size()
        tier = PinnedTier(capacity, granularity_bytes=1, min_pages=4,
                          chunk_bytes=[object_size() - CHUNK_HEADER_ALLOWANCE] if fits else [])
        self.made.append(tier)
        return tier


class TestPinnedTierFirstFit(_LeakCheck, TierConformance):
    """One page spanning the pool: plain first-fit placement."""

    def make_tier(self, capacity, tmp_path):
        tier = PinnedTier(capacity, granularity_bytes=1, page_bytes=capacity)
        self.made.append(tier)
        return tier


# Scaled-down layouts (bytes of one full chunk's payload): three "models".
LAYOUTS = {"big": 256 << 10, "mid": 112 << 10, "small": 45 << 10}


def _objects(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Full raw chunks, compressed chunks of varying size and final partial chunks of the three layouts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        payload = LAYOUTS[rng.choice(list(LAYOUTS))]
        kind = rng.random()
        if kind < 0.3:
            payload = int(payload / rng.uniform(3, 7))  # compressed
        elif kind < 0.45:
            payload = payload * rng.randint(1, 255) // 256  # final partial chunk
        key = make_key(f"mixed-{seed}-{i}")
        out.append((key, make_object(key, max(payload, 16))))
    return out


def _mixed_tier(capacity: int = 4 << 20, **kw) -> PinnedTier:
    return PinnedTier(capacity, chunk_bytes=list(LAYOUTS.values()), min_pages=8, **kw)


def test_mixed_layout_churn_evicts_lru_and_keeps_bytes_right():
    tier = _mixed_tier()
    evicted: dict[str, bytes] = {}
    tier.on_evict = lambda key, data: evicted.__setitem__(key, bytes(data))
    objects = _objects(150)
    expected = dict(objects)
    for key, data in objects:
        assert tier.put(key, data)
        assert tier.used_bytes <= tier.capacity_bytes
    resident = dict(tier.keys())
    assert set(resident) | set(evicted) == set(expected) and not set(resident) & set(evicted)
    assert all(evicted[k] == expected[k] for k in evicted)
    assert [bytes(b) for b in tier.get_many(list(resident))] == [expected[k] for k in resident]
    stats = tier.stats()
    assert stats["object_bytes"] == tier.used_bytes == sum(resident.values())
    assert stats["wasted_bytes"] < 0.25 * tier.capacity_bytes  # a tiny pool: a few pages of 512 KiB
    assert tier.allocator.stats().slab_pages > 0 and tier.allocator.stats().variable_pages > 0
    tier.delete_many(list(resident))
    assert tier.allocator.stats().free_pages == tier.allocator.num_pages


def test_lease_survives_later_puts_and_eviction():
    tier = _mixed_tier(2 << 20)
    key = make_key("leased")
    data = make_object(key, LAYOUTS["big"])
    tier.put(key, data)
    with tier.lease(key) as lease:
        assert bytes(lease.view()) == data and lease.nbytes == len(data)
        for other, obj in _objects(60, seed=1):  # many times the pool: everything else is evicted
            tier.put(other, obj)
        assert tier.contains(key) and bytes(lease.view()) == data
        assert bytes(lease.tensor.numpy()) == data
        assert tier.outstanding_leases == 1
    assert tier.outstanding_leases == 0
    for other, obj in _objects(60, seed=2):
        tier.put(other, obj)
    assert not tier.contains(key)  # unpinned: evictable again


def test_delete_while_leased_frees_on_release():
    tier = _mixed_tier(2 << 20)
    key = make_key("x")
    data = make_object(key, 50_000)
    tier.put(key, data)
    lease = tier.lease(key)
    assert tier.delete(key) and not tier.contains(key) and tier.get(key) is None and tier.used_bytes == 0
    assert tier.allocator.stats().objects == 1 and bytes(lease.view()) == data
    assert tier.put(key, data)  # a new copy goes to another slot
    lease.release()
    lease.release()  # idempotent
    assert tier.allocator.stats().objects == 1 and tier.outstanding_leases == 0
    with pytest.raises(RuntimeError):
        lease.view()


def test_get_returns_private_copies():
    tier = _mixed_tier(1 << 20)
    key = make_key("c")
    data = make_object(key, 30_000)
    tier.put(key, data)
    got = tier.get(key)
    tier.delete(key)
    for other, obj in _objects(30, seed=3):
        tier.put(other, obj)
    assert got == data


def test_full_of_leases_refuses_puts():
    tier = PinnedTier(64 << 10, granularity_bytes=4096, page_bytes=16 << 10)
    keys = [make_key(i) for i in range(5)]  # 5 x 12 KiB extents (they span pages) of 64 KiB
    for k in keys:
        assert tier.put(k, make_object(k, 12_000))
    assert tier.allocator.stats().free_pages == 0
    leases = tier.lease_many(keys + [make_key("missing")])
    assert leases[-1] is None
    assert tier.put(make_key("new"), make_object(make_key("new"), 12_000)) is False
    for lease in leases[:-1]:
        lease.release()
    assert tier.put(make_key("new"), make_object(make_key("new"), 12_000)) is True


def test_put_from_tensor_and_lease_tensor():
    tier = _mixed_tier(1 << 20)
    key = make_key("t")
    data = make_object(key, 20_000)
    tier.put(key, torch.frombuffer(bytearray(data), dtype=torch.uint8))
    with tier.lease(key) as lease:
        assert lease.tensor.dtype == torch.uint8 and bytes(lease.tensor.numpy()) == data
        assert lease.tensor.is_pinned() == torch.cuda.is_available()


def test_concurrent_puts_gets_and_leases():
    tier = _mixed_tier(2 << 20)
    objects = _objects(40, seed=4)
    expected = dict(objects)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(120):
            key, data = rng.choice(objects)
            op = rng.random()
            if op < 0.4:
                tier.put(key, data)
            elif op < 0.7:
                got = tier.get(key)
                if got is not None and got != expected[key]:
                    errors.append(f"get {key}")
            else:
                lease = tier.lease(key)
                if lease is not None:
                    with lease:
                        before = bytes(lease.view())
                        tier.put(*rng.choice(objects))
                        if before != expected[key] or bytes(lease.view()) != before:
                            errors.append(f"lease {key}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and tier.outstanding_leases == 0
    assert tier.used_bytes == sum(size for _, size in tier.keys()) <= tier.capacity_bytes


def test_built_from_config(tmp_path):
    spec = TierSpec.parse({"kind": "pinned", "capacity": "2MiB", "chunk_bytes": ["256KiB", 114688]})
    assert isinstance(spec.config, PinnedTierConfig) and spec.config.chunk_bytes == [256 << 10, 114688]
    tier = build_tier("pinned", spec.config, str(tmp_path))
    assert isinstance(tier, PinnedTier) and tier.capacity_bytes == 2 << 20
    assert tier.allocator.slot_sizes == [114688 + 4096, (256 << 10) + 4096]
    tier.close()
    with pytest.raises(Exception, match="chunk_bytes"):
        TierSpec.parse({"kind": "pinned", "capacity": "2MiB", "chunk_bytes": ["lots"]})
