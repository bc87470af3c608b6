"""Controller replicas through Redis: one active replica at a time, chosen by a lease in Redis (no consensus of ours).

Every replica runs :class:`ReplicaLease`. The active one holds the key ``kdn:controller:lease`` (``SET NX PX``) and
renews it every third of ``lease_ttl_s`` with a compare-and-expire script, so only the holder can extend it. A
replica that cannot renew for ``lease_ttl_s`` (Redis gone, or another holder) steps down before its lease could
have passed to anyone else. Standbys try to take the lease at the same period; after a kill -9 of the active replica
one of them serves within ``lease_ttl_s`` plus one period.

What is in Redis (shared by the replicas):

- the lease (strongly consistent: Redis is the single arbiter);
- pinned keys (the set ``kdn:controller:pins``, written through on every ``Pin``/``Unpin``: strongly consistent);
- node drain flags and removal tombstones (the set ``kdn:controller:draining`` and the hash
  ``kdn:controller:removed`` of node id -> removed epoch, written through on every ``DrainNode``/``RemoveNode``:
  strongly consistent; :mod:`kdn.controller.drain`);
- per-key placement statistics (the hash ``kdn:controller:stats``, a snapshot the active replica writes every
  ``STATS_PERIOD_S``: eventually consistent, a failover loses at most that many seconds of access counts).

The registry and the index are **not** copied to Redis: the nodes hold the truth (their inventories). A new active
replica starts empty; nodes whose heartbeat it does not know re-register and resend their full inventory, and until
then lookups answer "miss", never a wrong location (the rules of :mod:`kdn.controller.index`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdn.controller.index import GlobalIndex

__all__ = ["ReplicaLease", "LEASE_KEY", "PINS_KEY", "STATS_KEY", "DRAINING_KEY", "REMOVED_KEY"]

log = logging.getLogger(__name__)

LEASE_KEY = "kdn:controller:lease"
PINS_KEY = "kdn:controller:pins"
STATS_KEY = "kdn:controller:stats"
DRAINING_KEY = "kdn:controller:draining"
REMOVED_KEY = "kdn:controller:removed"
STATS_PERIOD_S = 5.0
MAX_STATS = 200_000

# Extend the lease only while we hold it; returns 1 when extended.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class ReplicaLease:
    """Holds or waits for the controller lease; calls ``on_change(active)`` on every transition."""

    def __init__(self, url: str, advertise: str, ttl_s: float, on_change: Callable[[bool], None]) -> None:
        import redis

        self.ttl_s = max(0.2, ttl_s)
        self.advertise = advertise
        self.token = f"{advertise}|{uuid.uuid4().hex[:12]}"
        self.on_change = on_change
        period = self.ttl_s / 3
        self.period_s = period
        self.redis = redis.Redis.from_url(url, socket_timeout=period, socket_connect_timeout=period)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self.active = False
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdn-controller-lease", daemon=True)

    # -- lease -------------------------------------------------------------------------------------------------
    def start(self) -> ReplicaLease:
        self._step()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.active:
            try:
                self._release(keys=[LEASE_KEY], args=[self.token])
            except Exception as exc:  # noqa: BLE001 - Redis may be gone; the lease then just expires
                log.debug("lease release failed: %s", exc)
            self._set(False)
        self.redis.close()

    def holder(self) -> str:
        """The advertised address of the active replica ('' when unknown or none)."""
        try:
            value = self.redis.get(LEASE_KEY)
        except Exception:  # noqa: BLE001
            return ""
        return value.decode(errors="replace").split("|")[0] if value else ""

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._step()

    def _step(self) -> None:
        ttl_ms = int(self.ttl_s * 1000)
        try:
            if self.active:
                held = bool(self._renew(keys=[LEASE_KEY], args=[self.token, ttl_ms]))
            else:
                held = bool(self.redis.set(LEASE_KEY, self.token, nx=True, px=ttl_ms))
            if held:
                self._renewed_at = time.monotonic()
            elif self.active:
                log.warning("controller lease lost to %s: stepping down", self.holder() or "another replica")
            self._set(held)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable
            # keep serving only while the lease we last renewed cannot have expired yet
            if self.active and time.monotonic() - self._renewed_at >= self.ttl_s * 0.8:
                log.warning("cannot renew the controller lease (%s): stepping down", exc)
                self._set(False)
            elif not self.active:
                log.debug("cannot reach Redis for the lease: %s", exc)

    def _set(self, active: bool) -> None:
        if active == self.active:
            return
        self.active = active
        log.info("controller replica %s is now %s", self.advertise, "ACTIVE" if active else "standby")
        try:
            self.on_change(active)
        except Exception:  # noqa: BLE001 - never kill the lease thread
            log.exception("replica transition failed")

    # -- shared state ------------------------------------------------------------------------------------------
    def load_pins(self) -> set[str]:
        return {k.decode() for k in self.redis.smembers(PINS_KEY)}

    def pin(self, keys: list[str]) -> None:
        if keys:
            self.redis.sadd(PINS_KEY, *keys)

    def unpin(self, keys: list[str]) -> None:
        if keys:
            self.redis.srem(PINS_KEY, *keys)

    def forget(self, keys: list[str]) -> None:
        """Keys evicted everywhere: unpin them and drop their statistics."""
        if keys:
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(PINS_KEY, *keys)
            pipe.hdel(STATS_KEY, *keys)
            pipe.execute()

    def load_nodes(self) -> tuple[set[str], dict[str, int]]:
        """(draining node ids, removed node id -> epoch)."""
        draining = {k.decode() for k in self.redis.smembers(DRAINING_KEY)}
        removed = {}
        for node_id, epoch in self.redis.hgetall(REMOVED_KEY).items():
            try:
                removed[node_id.decode()] = int(epoch)
            except ValueError:
                continue  # a damaged entry is a missing one
        return draining, removed

    def set_draining(self, node_id: str, draining: bool) -> None:
        if draining:
            self.redis.sadd(DRAINING_KEY, node_id)
        else:
            self.redis.srem(DRAINING_KEY, node_id)

    def set_removed(self, node_id: str, epoch: int | None) -> None:
        """Record a removal tombstone (``epoch``) or drop it (``None``); a removal also ends the drain."""
        pipe = self.redis.pipeline(transaction=True)
        if epoch is None:
            pipe.hdel(REMOVED_KEY, node_id)
        else:
            pipe.hset(REMOVED_KEY, node_id, str(epoch))
            pipe.srem(DRAINING_KEY, node_id)
        pipe.execute()

    def save_stats(self, index: GlobalIndex) -> int:
        """Snapshot per-key statistics (rates re-based on wall time, the replicas' common clock)."""
        now_mono, now_wall = time.monotonic(), time.time()
        with index._lock:
            items = list(index.stats.items())[:MAX_STATS]
        if not items:
            return 0
        mapping = {key: json.dumps([s.size, s.lookups, s.hits, s.created, s.last_access, s.rate,
                                    now_wall - (now_mono - s.rate_at), s.tokens, s.start, s.prefill_s, s.basis])
                   for key, s in items}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(STATS_KEY, mapping=mapping)
        pipe.execute()
        return len(mapping)

    def load_stats(self) -> dict:
        """``key -> KeyStats`` as last saved (seeds for keys the nodes report again)."""
        from kdn.controller.index import KeyStats

        now_mono, now_wall = time.monotonic(), time.time()
        out = {}
        for key, raw in self.redis.hscan_iter(STATS_KEY, count=5000):
            try:
                (size, lookups, hits, created, last_access, rate, rate_wall, tokens, start, prefill_s,
                 basis) = json.loads(raw)
                out[key.decode()] = KeyStats(size=int(size), lookups=int(lookups), hits=int(hits),
                                             created=float(created), last_access=float(last_access),
                                             rate=float(rate), rate_at=now_mono - (now_wall - float(rate_wall)),
                                             tokens=int(tokens), start=int(start), prefill_s=float(prefill_s),
                                             basis=str(basis))
            except (ValueError, TypeError):
                continue  # a damaged entry is a missing one
            if len(out) >= MAX_STATS:
                break
        return out
