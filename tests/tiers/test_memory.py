"""The memory tier against the shared tier conformance suite."""

from kdn.node.tiers.memory import MemoryTier
from tests.tiers.conformance import TierConformance


class TestMemoryTier(TierConformance):
    def make_tier(self, capacity, tmp_path):
        return MemoryTier(capacity)
