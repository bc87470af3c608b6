"""Per-tenant byte quotas of one node's tiers (``auth.quotas.<tenant>.bytes``), enforced where the bytes arrive.

The node keeps, for tenants that have a byte quota, the size of each of their objects in each tier, updated from
the tier stack's change events (puts, moves, evictions, deletes) and seeded from the inventory at start. A put
goes to the first tier at or below its target whose quota (and the quotas of the durable tiers a write-through
copies it to) has room; a move into a tier without room is refused. Bytes in flight are reserved, so concurrent
puts of one tenant cannot overshoot together.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kdn.wire.auth import key_tenant

if TYPE_CHECKING:
    from kdn.config import TenantQuota
    from kdn.node.tier_stack import TierStack
    from kdn.node.tiers.base import Buffer

__all__ = ["TierQuotas", "put_within_quota"]


class TierQuotas:
    """Bytes per (tenant, tier) on this node against the configured limits."""

    def __init__(self, quotas: dict[str, TenantQuota]) -> None:
        self.limits = {t: dict(q.bytes) for t, q in quotas.items() if q.bytes}
        self._sizes: dict[tuple[str, str], int] = {}  # (key, tier) -> size, limited tenants only
        self._used: dict[tuple[str, str], int] = {}  # (tenant, tier) -> bytes held or reserved
        self._kinds: set[str] = set()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.limits)

    def limited(self, key: str) -> bool:
        return key_tenant(key) in self.limits

    def changed(self, added: Iterable[tuple[str, str, int]], removed: Iterable[tuple[str, str]]) -> None:
        """Apply tier-stack change events."""
        if not self.limits:
            return
        with self._lock:
            for key, tier, size in added:
                self._kinds.add(tier)
                if self.limited(key):
                    old = self._sizes.get((key, tier), 0)
                    self._sizes[(key, tier)] = size
                    self._add(key_tenant(key), tier, size - old)
            for key, tier in removed:
                if self.limited(key):
                    self._add(key_tenant(key), tier, -self._sizes.pop((key, tier), 0))

    def _add(self, tenant: str, tier: str, delta: int) -> None:
        self._used[(tenant, tier)] = max(0, self._used.get((tenant, tier), 0) + delta)

    def used(self, tenant: str, tier: str) -> int:
        with self._lock:
            return self._used.get((tenant, tier), 0)

    def _room(self, tenant: str, tier: str, size: int, key: str) -> bool:
        limit = self.limits.get(tenant, {}).get(tier)
        if limit is None:
            return True
        held = self._sizes.get((key, tier), 0)  # a rewrite of a held object replaces its bytes
        return self._used.get((tenant, tier), 0) - held + size <= limit

    def reserve_put(self, key: str, size: int, chain: Sequence[Sequence[str]]) -> tuple[int, list[str]] | None:
        """For a put of ``key``: the index of the first entry of ``chain`` (each entry: the tiers one target
        would write, the target first) with room for ``size`` bytes in all its tiers, reserving them; None if
        none has room. Release the reservation with :meth:`release` after the put."""
        tenant = key_tenant(key)
        with self._lock:
            for i, tiers in enumerate(chain):
                if all(self._room(tenant, t, size, key) for t in tiers):
                    limited = [t for t in tiers if t in self.limits.get(tenant, {})]
                    for t in limited:
                        self._add(tenant, t, size)
                    return i, limited
        return None

    def release(self, key: str, size: int, tiers: Iterable[str]) -> None:
        with self._lock:
            for t in tiers:
                self._add(key_tenant(key), t, -size)

    def room_for_move(self, key: str, tier: str) -> bool:
        """Whether moving ``key`` (size: its largest held copy) into ``tier`` stays within its tenant's quota."""
        tenant = key_tenant(key)
        with self._lock:
            if tier not in self.limits.get(tenant, {}):
                return True
            size = max((self._sizes.get((key, t), 0) for t in self._kinds), default=0)
            return self._room(tenant, tier, size, key)



def put_within_quota(store: TierStack, quotas: TierQuotas, items: Sequence[tuple[str, Buffer]],
                     tier: str = "") -> list[tuple[bool, str]]:
    """``store.put_many`` where each object of a tenant with a byte quota goes to the first tier at or below
    ``tier`` (the top tier when "") whose quota has room, together with its write-through copies."""
    kinds = [t.kind for t in store.tiers]
    start = kinds.index(tier) if tier in kinds else 0
    chain = []
    for s in range(start, len(kinds)):
        below = [t.kind for t in store.tiers[s + 1:] if t.durable] if store.write_policy == "write-through" else []
        chain.append([kinds[s], *below])
    results: list[tuple[bool, str]] = [(False, "")] * len(items)
    groups: dict[int, list[int]] = {}
    reserved: dict[int, list[str]] = {}
    for i, (key, data) in enumerate(items):
        if not quotas.limited(key):
            groups.setdefault(0, []).append(i)
            continue
        found = quotas.reserve_put(key, len(data), chain)
        if found is None:
            limits = ", ".join(f"{t}: {n}" for t, n in sorted(quotas.limits[key_tenant(key)].items()))
            results[i] = (False, f"quota exceeded: tenant {key_tenant(key)!r} has no room left on this node "
                                 f"(byte limits {limits})")
            continue
        groups.setdefault(found[0], []).append(i)
        reserved[i] = found[1]
    try:
        for offset, indices in sorted(groups.items()):
            stored = store.put_many([items[i] for i in indices], tier=kinds[start + offset] if tier or offset else "")
            for i, ok in zip(indices, stored):
                results[i] = (ok, "" if ok else "no tier can hold the object")
    finally:
        for i, tiers in reserved.items():
            quotas.release(items[i][0], len(items[i][1]), tiers)
    return results
