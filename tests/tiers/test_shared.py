"""The shared-memory (memfd arena) tier: the conformance suite, with no leases left after each test."""

from __future__ import annotations

import mmap

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
    with tier.lease("t/k") as lease:
        header_len = len(obj) - 5000
        assert (lease.offset + header_len) % 4096 == 0 and lease.offset % 4096 != 0
        other = mmap.mmap(tier.fd, tier.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert other[lease.offset:lease.offset + len(obj)] == obj
        other.close()
    tier.close()
