"""The controller's global index: which node and tier holds which key, which nodes are alive.

Soft state: it is rebuilt from the nodes' full inventory reports after a controller restart (nodes resend theirs
when a heartbeat answers ``known=false``). A node that registers with a new epoch (it restarted) loses every entry
of its old epoch, so an old location is never served. Entries of nodes that missed heartbeats are kept but not
returned until the node is heard from again.

Per-key statistics (:class:`KeyStats`) feed cost-driven placement (:mod:`kdn.controller.placement`): every counted
lookup
hit updates a decayed access rate with :func:`costmodel.record_access`; ``Place`` seeds a new key's statistics
(its token count and prefill estimate) before the node reports it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from costmodel.placement import ChunkStats, record_access

__all__ = ["NodeRecord", "KeyStats", "Location", "GlobalIndex", "rendezvous_score"]

#: Statistics seeded by ``Place`` for keys not yet reported by a node (oldest dropped first).
MAX_SEEDS = 100_000


def rendezvous_score(node_id: str, key: str) -> bytes:
    """Highest-random-weight score of ``node_id`` for ``key`` (the node with the largest score wins)."""
    return hashlib.blake2b(f"{node_id}\0{key}".encode(), digest_size=8).digest()


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
    """What the controller knows about one key (sizes in bytes; ``rate_at`` in the placement clock)."""

    size: int = 0
    lookups: int = 0
    hits: int = 0
    created: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)
    """Wall-clock time of the last counted lookup (for display)."""
    rate: float = 0.0
    """Decayed accesses per hour as of ``rate_at`` (``costmodel.record_access``)."""
    rate_at: float = field(default_factory=time.monotonic)
    tokens: int = 0
    """Tokens in the chunk (0: unknown)."""
    start: int = 0
    """Position of the chunk's first token."""
    prefill_s: float = 0.0
    """GPU seconds a hit saves (0: not estimated yet)."""
    basis: str = ""
    """How ``prefill_s`` was obtained (shown by ``kdnctl inspect``)."""

    def access(self, now_s: float, half_life_s: float) -> None:
        """Count one access at ``now_s`` in the decayed rate."""
        after = record_access(ChunkStats(size_bytes=max(self.size, 1), reuse_per_hour=self.rate,
                                         prefill_seconds_saved=0.0, last_access_s=max(self.rate_at, 0.0)),
                              now_s, half_life_s)
        self.rate, self.rate_at = after.reuse_per_hour, after.last_access_s


@dataclass(frozen=True)
class Location:
    node_id: str
    address: str
    bulk_address: str
    tier: str
    size: int


class GlobalIndex:
    """Thread-safe key -> locations map plus the node registry."""

    def __init__(self, node_timeout_s: float = 10.0, half_life_s: float = 3600.0) -> None:
        self.node_timeout_s = node_timeout_s
        self.half_life_s = half_life_s
        self.nodes: dict[str, NodeRecord] = {}
        self._where: dict[str, dict[str, dict[str, int]]] = {}  # key -> node_id -> tier -> size
        self._node_keys: dict[str, set[str]] = {}
        self.stats: dict[str, KeyStats] = {}
        self.pinned: set[str] = set()
        self._seeds: OrderedDict[str, KeyStats] = OrderedDict()
        self.draining: set[str] = set()
        """Node ids being drained (:mod:`kdn.controller.drain`): never placed on; their copies are listed last.
        Not soft state: :meth:`clear` keeps it."""
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

    def live_nodes(self, now: float | None = None) -> list[NodeRecord]:
        now = now or time.monotonic()
        with self._lock:
            return [r for r in self.nodes.values() if self.alive(r, now)]

    def placeable_nodes(self, now: float | None = None) -> list[NodeRecord]:
        """Live nodes that take new objects (not draining)."""
        return [r for r in self.live_nodes(now) if r.node_id not in self.draining]

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
                stats = self.stats.get(key)
                if stats is None:
                    stats = self.stats[key] = self._seeds.pop(key, None) or KeyStats()
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
        if self.draining and len(out) > 1:
            out.sort(key=lambda loc: loc.node_id in self.draining)  # copies elsewhere first
        return out

    def lookup(self, keys: Sequence[str], prefix: bool, count: bool = True,
               access_s: float | None = None) -> list[list[Location]]:
        """Locations per key; with ``prefix`` the result stops after the first miss.

        With ``count``, each hit is an access: it updates the key's decayed rate (at ``access_s`` in the placement
        clock, default ``time.monotonic()``). Probes (a store checking what exists, admin tools) pass ``False``.
        """
        now = time.monotonic()
        access_s = now if access_s is None else access_s
        wall = time.time()
        out = []
        with self._lock:
            for key in keys:
                locs = self.locations(key, now)
                out.append(locs)
                stats = self.stats.get(key)
                if stats is not None and count:
                    stats.lookups += 1
                    stats.hits += bool(locs)
                    if locs:
                        stats.last_access = wall
                        stats.access(access_s, self.half_life_s)
                if prefix and not locs:
                    break
        return out

    def seed(self, key: str, stats: KeyStats) -> None:
        """Statistics for a key about to be stored (``Place``); used when a node first reports it."""
        with self._lock:
            if key in self.stats:
                return
            self._seeds[key] = stats
            self._seeds.move_to_end(key)
            while len(self._seeds) > MAX_SEEDS:
                self._seeds.popitem(last=False)

    def node_entries(self, node_id: str) -> list[tuple[str, dict[str, int], KeyStats]]:
        """A snapshot of ``(key, {tier: size}, stats)`` for every key the node holds."""
        with self._lock:
            out = []
            for key in self._node_keys.get(node_id, ()):
                tiers = self._where.get(key, {}).get(node_id)
                stats = self.stats.get(key)
                if tiers and stats is not None:
                    out.append((key, dict(tiers), stats))
            return out

    def drain_view(self, node_id: str, now: float | None = None
                   ) -> list[tuple[str, dict[str, int], KeyStats | None, dict[str, dict[str, int]]]]:
        """For every key ``node_id`` holds: ``(key, {tier: size} there, stats, {other node: {tier: size}})``, the
        other nodes being live ones that are not draining."""
        now = now or time.monotonic()
        with self._lock:
            usable = {n for n, r in self.nodes.items() if n != node_id and n not in self.draining
                      and self.alive(r, now)}
            out = []
            for key in self._node_keys.get(node_id, ()):
                holders = self._where.get(key, {})
                own = holders.get(node_id)
                if own:
                    others = {n: dict(t) for n, t in holders.items() if n in usable and t}
                    out.append((key, dict(own), self.stats.get(key), others))
            return out

    def where(self, key: str) -> dict[str, dict[str, int]]:
        """``node_id -> {tier: size}`` for ``key`` (live or not)."""
        with self._lock:
            return {node_id: dict(tiers) for node_id, tiers in self._where.get(key, {}).items()}

    def drop_entries(self, node_id: str, keys: Iterable[str]) -> None:
        """Forget that ``node_id`` holds ``keys`` (after evicting them there), before its inventory says so."""
        with self._lock:
            node_keys = self._node_keys.get(node_id, set())
            for key in keys:
                holders = self._where.get(key)
                if holders is None or holders.pop(node_id, None) is None:
                    continue
                node_keys.discard(key)
                if not holders:
                    self._forget(key)

    def place(self, key: str, size: int) -> NodeRecord | None:
        """The node that should store ``key``: rendezvous hashing over live nodes with room, else any live node
        (draining nodes excluded)."""
        live = self.placeable_nodes()
        if not live:
            return None
        roomy = [r for r in live if r.free_bytes() >= size] or live
        return max(roomy, key=lambda r: rendezvous_score(r.node_id, key))

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

    def clear(self) -> None:
        """Forget every node, entry, statistic and pin (a replica that starts or stops serving)."""
        with self._lock:
            self.nodes.clear()
            self._where.clear()
            self._node_keys.clear()
            self.stats.clear()
            self.pinned.clear()
            self._seeds.clear()

    def totals(self) -> tuple[int, int]:
        """(keys, bytes) in the index."""
        with self._lock:
            return len(self._where), sum(s.size for s in self.stats.values())
