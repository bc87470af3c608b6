"""The shared-memory (memfd arena) tier: the conformance suite, with no leases left after each test."""

from __future__ import annotations

import mmap
import os

import pytest

from kdn.format.chunk import build_object
from kdn.node.tiers.shared import SharedMemoryTier
from tests.tiers.conformance import TierConformance


class TestSharedMemoryTier(TierConformance):
    @pytest.fixture(autouse=True)
    def _no_pins_left(self):
        self.made: list[SharedMemoryTier] = []
        yield
        assert [t.outstanding_leases for t in self.made] == [0] * len(self.made)

    def make_tier(self, capacity, tmp_path):
        tier = SharedMemoryTier(capacity, granularity_bytes=1, page_bytes=capacity, align=1)  # exact capacities
        self.made.append(tier)
        return tier


def test_arena_is_a_sealed_memfd_another_mapping_sees_and_payloads_are_page_aligned():
    tier = SharedMemoryTier(1 << 20)
    obj = build_object(codec="raw", key="t/k", fingerprint=bytes(16), num_tokens=1, start=0, num_layers=1,
                       sections=[(0, 1, b"x" * 5000)])
    assert tier.put("t/k", obj)
    arena = tier.arena("t")
    assert arena is not None and tier.arena("u") is None
    with pytest.raises(PermissionError):  # sealed: never resized under a client's mapping
        os.ftruncate(arena.fd, 4096)
    with tier.lease("t/k") as lease:
        header_len = len(obj) - 5000
        assert (lease.offset + header_len) % 4096 == 0 and lease.offset % 4096 != 0
        assert tier.arena_of(lease) is arena
        other = mmap.mmap(arena.fd, tier.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert other[lease.offset:lease.offset + len(obj)] == obj
        other.close()
    tier.close()


def _obj(key: str, fill: bytes, n: int = 40_000) -> bytes:
    return build_object(codec="raw", key=key, fingerprint=bytes(16), num_tokens=1, start=0, num_layers=1,
                        sections=[(0, 1, fill * n)])


def _mapped(arena) -> bytes:
    with mmap.mmap(arena.fd, arena.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
        return bytes(m)


def test_each_tenant_has_its_own_arena_and_reused_space_is_punched_out_of_the_old_one():
    """Tenants share the capacity (one allocator, LRU across tenants) but never a file: an arena holds only its
    tenant's bytes, and space another tenant takes over is removed from the old tenant's arena first."""
    tier = SharedMemoryTier(256 << 10, page_bytes=64 << 10)  # four pages: ~6 objects of 40 KiB
    acme = [(f"acme/{i}", _obj(f"acme/{i}", b"A")) for i in range(5)]
    assert tier.put_many(acme) == [True] * 5
    a = tier.arena("acme")
    assert tier.arena("globex") is None and b"AAAA" in _mapped(a)
    globex = [(f"globex/{i}", _obj(f"globex/{i}", b"G")) for i in range(5)]
    assert tier.put_many(globex) == [True] * 5  # evicts acme's oldest objects across tenants
    g = tier.arena("globex")
    assert g is not a and g.fd != a.fd and tier.used_bytes <= tier.capacity_bytes
    assert b"AAAA" not in _mapped(g), "globex's arena holds acme bytes"
    assert b"GGGG" not in _mapped(a), "acme's arena holds globex bytes"
    live_acme = [k for k, _ in acme if tier.contains(k)]
    assert len(live_acme) < 5 and a.punched_bytes > 0
    # What acme's arena still holds is exactly its live objects (evicted ones were punched when globex took over).
    assert _mapped(a).count(b"A" * 40_000) == len(live_acme)
    for key, data in acme + globex:
        got = tier.get(key)
        assert got is None or bytes(got) == data
    assert tier.stats()["arenas"] == 2
    tier.close()


def test_arena_limit_refuses_further_tenants():
    tier = SharedMemoryTier(256 << 10, page_bytes=64 << 10, max_arenas=1)
    assert tier.put("acme/1", _obj("acme/1", b"A", 100))
    assert not tier.put("globex/1", _obj("globex/1", b"G", 100)) and tier.arena("globex") is None
    assert tier.put("acme/2", _obj("acme/2", b"A", 100))
    tier.close()
