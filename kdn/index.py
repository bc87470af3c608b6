"""The controller's global index: which node and tier holds which key, which nodes are alive.

Soft state: it is rebuilt from the nodes' full inventory reports after a controller restart (nodes resend theirs
when a heartbeat answers ``known=false``). A node that registers with a new epoch (it restarted) loses every entry
of its old epoch, so an old location is never served. Entries of nodes that missed heartbeats are kept but not
returned until the node is heard from again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["NodeRecord", "KeyStats", "Location", "GlobalIndex"]


@dataclass
class NodeRecord:
    node_id: str
    address: str
    bulk_address: str
    epoch: int
    tiers: list[tuple[str, int, int]] = field(default_factory=list)
    """``(kind, capacity_bytes, used_bytes)`` per tier, fastest first."""
    last_seen: float = field(default_factory=time.monotonic)

    def free_bytes(self) -> int:
        return sum(max(0, cap - used) for _, cap, used in self.tiers)


@dataclass
class KeyStats:
    size: int = 0
    lookups: int = 0
    hits: int = 0
    created: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Location:
    node_id: str
    address: str
    bulk_address: str
    tier: str
    size: int


class GlobalIndex:
    """Thread-safe key -> locations map plus the node registry."""

    def __init__(self, node_timeout_s: float = 10.0) -> None:
        self.node_timeout_s = node_timeout_s
        self.nodes: dict[str, NodeRecord] = {}
        self._where: dict[str, dict[str, dict[str, int]]] = {}  # key -> node_id -> tier -> size
        self._node_keys: dict[str, set[str]] = {}
        self.stats: dict[str, KeyStats] = {}
        self.pinned: set[str] = set()
        self._lock = threading.RLock()

    # -- nodes -------------------------------------------------------------------------------------------------
    def alive(self, record: NodeRecord, now: float | None = None) -> bool:
        return ((now or time.monotonic()) - record.last_seen) <= self.node_timeout_s

    def register(self, record: NodeRecord) -> None:
        with self._lock:
            old = self.nodes.get(record.node_id)
            if old is not None and old.epoch != record.epoch:
                self._drop_node_entries(record.node_id)
            self.nodes[record.node_id] = record

    def heartbeat(self, node_id: str, epoch: int, tiers: list[tuple[str, int, int]]) -> bool:
        with self._lock:
            record = self.nodes.get(node_id)
            if record is None or record.epoch != epoch:
                return False
            record.last_seen = time.monotonic()
            record.tiers = tiers
            return True

    def remove_node(self, node_id: str) -> bool:
        with self._lock:
            self._drop_node_entries(node_id)
            return self.nodes.pop(node_id, None) is not None

    def _drop_node_entries(self, node_id: str) -> None:
        for key in self._node_keys.pop(node_id, set()):
            holders = self._where.get(key)
            if holders is not None:
                holders.pop(node_id, None)
                if not holders:
                    self._forget(key)

    def _forget(self, key: str) -> None:
        self._where.pop(key, None)
        self.stats.pop(key, None)

    # -- inventory ---------------------------------------------------------------------------------------------
    def apply(self, node_id: str, epoch: int, full: bool, added: Iterable[tuple[str, str, int]],
              removed: Iterable[tuple[str, str]]) -> bool:
        """Apply an inventory report; False when the node (at that epoch) is unknown."""
        with self._lock:
            record = self.nodes.get(node_id)
            if record is None or record.epoch != epoch:
                return False
            record.last_seen = time.monotonic()
            if full:
                self._drop_node_entries(node_id)
            keys = self._node_keys.setdefault(node_id, set())
            for key, tier, size in added:
                self._where.setdefault(key, {}).setdefault(node_id, {})[tier] = size
                keys.add(key)
                stats = self.stats.setdefault(key, KeyStats())
                stats.size = max(stats.size, size)
            for key, tier in removed:
                holders = self._where.get(key)
                if holders is None or node_id not in holders:
                    continue
                holders[node_id].pop(tier, None)
                if not holders[node_id]:
                    del holders[node_id]
                    keys.discard(key)
                if not holders:
                    self._forget(key)
            return True

    # -- queries -----------------------------------------------------------------------------------------------
    def locations(self, key: str, now: float | None = None) -> list[Location]:
        """Live locations of ``key``, fastest tier first on each node."""
        now = now or time.monotonic()
        out = []
        with self._lock:
            for node_id, tiers in self._where.get(key, {}).items():
                record = self.nodes.get(node_id)
                if record is None or not self.alive(record, now):
                    continue
                order = [t for t, _, _ in record.tiers]
                best = min(tiers, key=lambda t: order.index(t) if t in order else len(order))
                out.append(Location(node_id, record.address, record.bulk_address, best, tiers[best]))
        return out

    def lookup(self, keys: Sequence[str], prefix: bool) -> list[list[Location]]:
        """Locations per key; with ``prefix`` the result stops after the first miss."""
        now = time.monotonic()
        wall = time.time()
        out = []
        with self._lock:
            for key in keys:
                locs = self.locations(key, now)
                out.append(locs)
                stats = self.stats.get(key)
                if stats is not None:
                    stats.lookups += 1
                    stats.last_access = wall
                    stats.hits += bool(locs)
                if prefix and not locs:
                    break
        return out

    def place(self, key: str, size: int) -> NodeRecord | None:
        """The node that should store ``key``: rendezvous hashing over live nodes with room, else any live node."""
        now = time.monotonic()
        with self._lock:
            live = [r for r in self.nodes.values() if self.alive(r, now)]
        if not live:
            return None
        roomy = [r for r in live if r.free_bytes() >= size] or live

        def score(record: NodeRecord) -> bytes:
            return hashlib.blake2b(f"{record.node_id}\0{key}".encode(), digest_size=8).digest()

        return max(roomy, key=score)

    def holders(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """node_id -> keys it holds, for forwarding deletes."""
        out: dict[str, list[str]] = {}
        with self._lock:
            for key in keys:
                for node_id in self._where.get(key, {}):
                    out.setdefault(node_id, []).append(key)
        return out

    def keys_with_prefix(self, prefix: str, limit: int) -> tuple[list[str], bool]:
        with self._lock:
            matches = sorted(k for k in self._where if k.startswith(prefix))
        return matches[:limit], len(matches) > limit

    def forget(self, keys: Iterable[str]) -> int:
        with self._lock:
            count = 0
            for key in keys:
                holders = self._where.get(key)
                if holders is None:
                    continue
                for node_id in holders:
                    self._node_keys.get(node_id, set()).discard(key)
                self._forget(key)
                self.pinned.discard(key)
                count += 1
            return count

    def totals(self) -> tuple[int, int]:
        """(keys, bytes) in the index."""
        with self._lock:
            return len(self._where), sum(s.size for s in self.stats.values())
