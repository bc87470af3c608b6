"""Draining and removing storage nodes (``kdnctl nodes drain|remove``; docs/operations.md).

**Drain.** A draining node takes no new objects (:meth:`GlobalIndex.placeable_nodes` skips it for ``Place`` and
for drain targets) and keeps serving what it holds; lookups list its copies after any other. Each heartbeat of a
draining node is answered with copy orders (``HeartbeatReply.copies``) for the objects whose only live copy it
holds, hottest first, at most :data:`BATCH_KEYS` keys / :data:`BATCH_BYTES` bytes at a time, each to the node that
rendezvous hashing picks among the others with room. The draining node pushes each object to that node's
``Data.Replicate``; the copy shows up in the index when the target reports it, and the key then stops being
pending. An order not fulfilled within :data:`RETRY_S` is given again. Objects whose fastest copy is on the
draining node while another node holds them only in a slower tier it also has, and that were hit at least once,
are promoted there with the existing admin ``Move``. The controller never sees payload bytes.

**Remove.** Refused unless the node is dead, or draining with nothing pending (or ``force``). It drops the node
and every index entry on it, and keeps a tombstone ``node_id -> epoch``: the same node process (epoch) is refused
if it registers again; a restarted one (new epoch) registers as a fresh node, not draining, and its full
inventory is indexed again.

**Shared state.** The draining set and the tombstones are written through to Redis with ``controller.redis``
(:mod:`kdn.controller.ha`; before the call is acknowledged, strongly consistent across replicas), else to
``<data_dir>/nodes.json``, else kept in memory only (lost on restart).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from kdn.errors import InvalidRequest, NotFound, Unavailable

if TYPE_CHECKING:
    from kdn.controller.index import GlobalIndex, NodeRecord

__all__ = ["NodeStates", "Drainer", "BATCH_KEYS", "BATCH_BYTES", "RETRY_S"]

log = logging.getLogger(__name__)

BATCH_KEYS = 2000
"""Most copy orders in one heartbeat reply."""
BATCH_BYTES = 256 << 20
"""Most object bytes ordered in one heartbeat reply (at least one object is always ordered)."""
RETRY_S = 30.0
"""An order still unfulfilled after this long is given again."""
STATE_FILE = "nodes.json"


class NodeStates:
    """The draining set (``index.draining``, mutated in place) and the removal tombstones, persisted."""

    def __init__(self, index: GlobalIndex, data_dir: str = "") -> None:
        self.index = index
        self.removed: dict[str, int] = {}
        self.replica: Any = None  # a ReplicaLease with controller.redis: Redis holds the state
        self.path = os.path.join(data_dir, STATE_FILE) if data_dir else ""
        self._lock = threading.Lock()
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                index.draining.update(str(n) for n in data.get("draining", []))
                self.removed.update({str(k): int(v) for k, v in data.get("removed", {}).items()})
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring unreadable %s: %s", self.path, exc)

    def load_shared(self) -> None:
        """Replace the state with Redis's (a replica that becomes active)."""
        draining, removed = self.replica.load_nodes()
        with self._lock:
            self.index.draining.clear()
            self.index.draining.update(draining)
            self.removed.clear()
            self.removed.update(removed)

    def _save_file(self, draining: set[str], removed: dict[str, int]) -> None:
        if not self.path:
            return
        data = {"draining": sorted(draining), "removed": removed}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".nodes-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise Unavailable(f"node state not recorded: cannot write {self.path} ({exc})") from exc

    def _shared(self, op: str, *args: Any) -> None:
        try:
            getattr(self.replica, op)(*args)
        except Exception as exc:  # noqa: BLE001 - redis errors are not KDN errors
            raise Unavailable(f"node state not recorded: Redis unreachable ({exc})") from exc

    def set_draining(self, node_id: str, draining: bool) -> None:
        with self._lock:
            if self.replica is not None:
                self._shared("set_draining", node_id, draining)
            after = self.index.draining | {node_id} if draining else self.index.draining - {node_id}
            self._save_file(after, self.removed)
            if draining:
                self.index.draining.add(node_id)
            else:
                self.index.draining.discard(node_id)

    def set_removed(self, node_id: str, epoch: int | None) -> None:
        """Tombstone ``node_id`` at ``epoch`` (ending its drain), or drop its tombstone (``None``)."""
        with self._lock:
            if self.replica is not None:
                self._shared("set_removed", node_id, epoch)
            removed = {k: v for k, v in self.removed.items() if k != node_id}
            if epoch is not None:
                removed[node_id] = epoch
            self._save_file(self.index.draining - {node_id} if epoch is not None else self.index.draining, removed)
            if epoch is None:
                self.removed.pop(node_id, None)
            else:
                self.removed[node_id] = epoch
                self.index.draining.discard(node_id)

    def check_register(self, node_id: str, epoch: int) -> None:
        """Refuse the removed node process itself; a new epoch of it clears the tombstone (a fresh node)."""
        removed = self.removed.get(node_id)
        if removed is None:
            return
        if removed == epoch:
            raise InvalidRequest(f"node {node_id!r} (epoch {epoch:x}) was removed by an operator; restart it to "
                                 "register as a fresh node")
        self.set_removed(node_id, None)
        log.info("removed node %s registers again with a new epoch: a fresh node", node_id)


class Drainer:
    """Plans a draining node's copy orders and promotions (see the module docstring)."""

    def __init__(self, index: GlobalIndex, states: NodeStates, mover: Any = None) -> None:
        self.index = index
        self.states = states
        self.mover = mover  # .move(record, keys, tier) -> list[bool]: the admin Move on a node
        self._ordered: dict[str, float] = {}
        self._promoted: dict[str, float] = {}
        self._lock = threading.Lock()
        self._promoting = False
        self.counters = {"ordered": 0, "promoted": 0}

    def pending(self, node_id: str) -> int:
        """Keys ``node_id`` holds that have no live copy on another node that is not draining."""
        return sum(1 for *_, others in self.index.drain_view(node_id) if not others)

    def orders(self, node_id: str, now: float | None = None) -> list[tuple[str, NodeRecord, str]]:
        """``(key, target node, tier hint)`` copy orders for one heartbeat of the draining ``node_id``; starts the
        promotions of hot keys whose fastest copy is there."""
        now = now or time.monotonic()
        own = self.index.nodes.get(node_id)
        if own is None or node_id not in self.index.draining:
            return []
        own_order = [k for k, _, _ in own.tiers]
        sole, promote = [], []
        for key, tiers, stats, others in self.index.drain_view(node_id):
            if not others:
                sole.append((stats.rate if stats else 0.0, key, max(tiers.values())))
                continue
            if stats is None or stats.hits <= 0 or self.mover is None:
                continue
            best = min(tiers, key=lambda t: own_order.index(t) if t in own_order else len(own_order))
            target = self._slower_holder(others, best)
            if target is not None:
                promote.append((target, key, best))
        sole.sort(key=lambda item: -item[0])
        out: list[tuple[str, NodeRecord, str]] = []
        nbytes = 0
        with self._lock:
            for key in [k for k, t in self._ordered.items() if now - t > RETRY_S]:
                del self._ordered[key]
            for _, key, size in sole:
                if key in self._ordered:
                    continue
                if out and (len(out) >= BATCH_KEYS or nbytes + size > BATCH_BYTES):
                    break
                record = self.index.place(key, size)
                if record is None:
                    break  # no other node takes objects
                self._ordered[key] = now
                out.append((key, record, ""))
                nbytes += size
            self.counters["ordered"] += len(out)
        if promote:
            self._start_promotions(promote, now)
        return out

    def _slower_holder(self, others: dict[str, dict[str, int]], tier: str) -> NodeRecord | None:
        """A holder with ``tier`` among its tiers whose fastest copy is slower than ``tier`` (None when any holder
        already has one at least as fast)."""
        candidate = None
        for other_id, other_tiers in others.items():
            record = self.index.nodes.get(other_id)
            if record is None:
                continue
            order = [k for k, _, _ in record.tiers]
            have = min(order.index(t) if t in order else len(order) for t in other_tiers)
            if tier not in order:
                continue
            if have <= order.index(tier):
                return None
            candidate = candidate or record
        return candidate

    def _start_promotions(self, promote: list[tuple[NodeRecord, str, str]], now: float) -> None:
        with self._lock:
            if self._promoting:
                return
            for key in [k for k, t in self._promoted.items() if now - t > RETRY_S]:
                del self._promoted[key]
            groups: dict[tuple[str, str], tuple[NodeRecord, list[str]]] = {}
            for record, key, tier in promote:
                if key not in self._promoted and sum(len(v[1]) for v in groups.values()) < BATCH_KEYS:
                    self._promoted[key] = now
                    groups.setdefault((record.node_id, tier), (record, []))[1].append(key)
            if not groups:
                return
            self._promoting = True
        threading.Thread(target=self._promote, args=(groups,), name="kdn-drain-promote", daemon=True).start()

    def _promote(self, groups: dict[tuple[str, str], tuple[NodeRecord, list[str]]]) -> None:
        try:
            for (_, tier), (record, keys) in groups.items():
                try:
                    moved = sum(bool(ok) for ok in self.mover.move(record, keys, tier))
                except Exception as exc:  # noqa: BLE001 - a node away: the next heartbeat tries again
                    log.warning("drain: promoting %d keys to %s on %s failed: %s", len(keys), tier,
                                record.node_id, exc)
                    continue
                with self._lock:
                    self.counters["promoted"] += moved
        finally:
            with self._lock:
                self._promoting = False

    def removable(self, node_id: str, force: bool) -> NodeRecord:
        """The node's record if it may be removed now; raises :class:`NotFound` / :class:`InvalidRequest`."""
        record = self.index.nodes.get(node_id)
        if record is None:
            raise NotFound(f"no node {node_id!r} is registered")
        if force or not self.index.alive(record):
            return record
        if node_id not in self.index.draining:
            raise InvalidRequest(f"node {node_id!r} is alive and not draining: drain it first "
                                 f"(kdnctl nodes drain {node_id}) or pass --force")
        pending = self.pending(node_id)
        if pending:
            raise InvalidRequest(f"node {node_id!r} is still draining: {pending} object(s) have no copy elsewhere "
                                 "yet (or pass --force)")
        return record

    def forget(self, node_id: str) -> None:
        """Drop the outstanding orders (a removed node)."""
        with self._lock:
            self._ordered.clear()
