"""The controller: node registry, global index, lookups, placement, eviction and pinning over gRPC.

It is never on the data path. Its state is soft: after a restart the nodes re-register and resend their full
inventories; until then lookups answer "miss", never a wrong location. The exception is codec model profiles
(``PutProfile``/``GetProfile``, :mod:`kdn.controller.profile_store`): uploaded once, kept in ``<data_dir>/profiles``.

Placement (``placement.policy``): ``cost`` (default) picks each new chunk's tier with the cost model and runs a
periodic pass that promotes, demotes and evicts (:mod:`kdn.controller.placement`); ``hash`` only spreads chunks over
nodes
by rendezvous hashing and leaves tiers to the nodes.

Roles (:mod:`kdn.wire.auth`, docs/security.md): storage-node tokens may only register, heartbeat and report their
inventory; tenant tokens see and change only their tenant's keys, and ``Stats`` / ``ListNodes`` report only their
tenant's keys and bytes; admin tokens act on every tenant and alone may upload codec profiles.

Nodes (``DrainNode``/``RemoveNode``, admin only; :mod:`kdn.controller.drain`): a draining node takes no new objects
and is told on each heartbeat which of its objects to copy to which node; a removed node's locations vanish.

Replicas (``controller.redis``, :mod:`kdn.controller.ha`): one replica holds a lease in Redis and serves; the others
answer every call with UNAVAILABLE (clients and nodes try the next address). Every server also runs the standard
gRPC health service: ``""`` is SERVING while the process runs (liveness), ``kdn.v1.Control`` only on the replica
that serves (readiness).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from kdn.config import KDNConfig
from kdn.controller.drain import Drainer, NodeStates
from kdn.controller.index import GlobalIndex, Location, NodeRecord
from kdn.controller.node_link import NodeLink
from kdn.controller.placement import CostPlacement, PlaceHints
from kdn.controller.profile_store import ProfileStore
from kdn.errors import CapacityError, InvalidRequest, NotFound, Unavailable
from kdn.metrics import ControllerMetrics
from kdn.v1 import common_pb2, control_pb2, control_pb2_grpc
from kdn.wire.auth import ADMIN, DIGEST_PREFIX, Authenticator, Principal, RateLimiter, key_tenant
from kdn.wire.rpc import create_server, servicer_method

__all__ = ["Controller"]

log = logging.getLogger(__name__)

MAX_KEYS_PER_CALL = 100_000
#: Name of the control service in the gRPC health service (readiness: SERVING on the replica that serves).
HEALTH_SERVICE = "kdn.v1.Control"


def _location(loc: Location) -> common_pb2.Location:
    return common_pb2.Location(node_id=loc.node_id, address=loc.address, bulk_address=loc.bulk_address,
                               tier=loc.tier, size=loc.size)


class Controller:
    """Owns the index and the gRPC control-plane server."""

    def __init__(self, config: KDNConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.index = GlobalIndex(config.controller.node_timeout_s, config.placement.half_life_s)
        self.placement = CostPlacement(config.placement, self.index, _NodeMover(self))
        self.node_states = NodeStates(self.index, config.data_dir)  # drain flags and removal tombstones
        self.drainer = Drainer(self.index, self.node_states, _NodeMover(self))
        self.auth = Authenticator(config.auth.tokens)
        self.rate = RateLimiter({t: q.requests_per_s for t, q in config.auth.quotas.items()})
        self.admin_token = config.auth.admin_token or next(
            (t for t, role in config.auth.tokens.items() if role == ADMIN and not t.startswith(DIGEST_PREFIX)), "")
        self.metrics = ControllerMetrics(registry or CollectorRegistry())
        self.placement.on_pass = self._count_pass
        # codec model profiles are the controller's only durable state: kept in <data_dir>/profiles
        self.profiles = ProfileStore(os.path.join(config.data_dir, "profiles") if config.data_dir else None)
        self.started_at = time.monotonic()
        self.counters = {"lookups": 0, "lookup_keys": 0, "lookup_hits": 0}
        self.tenant_counters: dict[str, dict[str, int]] = {}
        self.port = 0
        self._server = None
        self._node_clients: dict[str, NodeLink] = {}
        self._lock = threading.Lock()
        self.replica = None  # a kdn.controller.ha.ReplicaLease with controller.redis
        self._health_server = None
        self.health_port = -1
        self.health = health.HealthServicer()
        self._stats_stop = threading.Event()
        self._stats_thread: threading.Thread | None = None

    @property
    def serving(self) -> bool:
        """Whether this process answers control calls (always, unless it is a standby replica)."""
        return self.replica is None or self.replica.active

    def start(self) -> Controller:
        cfg = self.config.controller
        self._server, self.port = create_server(cfg.host, cfg.port, tls=self.config.tls)
        control_pb2_grpc.add_ControlServicer_to_server(ControlServicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._set_ready(not cfg.redis)
        self._server.start()
        if cfg.health_port >= 0:  # health only, no TLS: it answers SERVING / NOT_SERVING and nothing else
            self._health_server, self.health_port = create_server(cfg.host, cfg.health_port, workers=2)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self._health_server.start()
        if cfg.redis:
            from kdn.controller.ha import ReplicaLease

            advertise = cfg.advertise or f"{cfg.host}:{self.port}"
            self.replica = ReplicaLease(cfg.redis, advertise, cfg.lease_ttl_s, self._on_active)
            self.node_states.replica = self.replica
            self.replica.start()
            self._stats_thread = threading.Thread(target=self._save_stats_loop, name="kdn-controller-stats",
                                                  daemon=True)
            self._stats_thread.start()
        if not self.auth.open and not self.admin_token:
            log.warning("auth.tokens has no @admin token in plain and auth.admin_token is unset: evictions and "
                        "placement moves on nodes will be refused")
        if self.cost_driven:
            self.placement.start()
        log.info("controller serving on %s:%d (placement: %s)", cfg.host, self.port, self.config.placement.policy)
        return self

    @property
    def cost_driven(self) -> bool:
        return self.config.placement.policy == "cost"

    def _count_pass(self, done: dict[str, int]) -> None:
        for action, count in done.items():
            if count:
                self.metrics.placement_actions.labels(action).inc(count)

    def _set_ready(self, ready: bool) -> None:
        self.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING if ready
                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _on_active(self, active: bool) -> None:
        """Replica transitions: start from an empty index either way (the nodes resend their inventories to
        whichever replica serves); an active replica takes the pins and key statistics from Redis."""
        self.index.clear()
        if active:
            try:
                pins, stats = self.replica.load_pins(), self.replica.load_stats()
            except Exception as exc:  # noqa: BLE001 - serve anyway; pins and statistics come back as Redis does
                log.warning("cannot load pins and key statistics from Redis: %s", exc)
                pins, stats = set(), {}
            with self._lock:
                self.index.pinned.update(pins)
            for key, key_stats in stats.items():
                self.index.seed(key, key_stats)
            try:
                self.node_states.load_shared()
            except Exception as exc:  # noqa: BLE001 - keep the last known drain state until Redis answers
                log.warning("cannot load node drain state from Redis: %s", exc)
            log.info("active: %d pins, %d key statistics and %d draining node(s) from Redis", len(pins), len(stats),
                     len(self.index.draining))
        self._set_ready(active)

    def _save_stats_loop(self) -> None:
        from kdn.controller.ha import STATS_PERIOD_S

        while not self._stats_stop.wait(STATS_PERIOD_S):
            if self.replica is not None and self.replica.active:
                try:
                    self.replica.save_stats(self.index)
                except Exception as exc:  # noqa: BLE001 - Redis away: the next period tries again
                    log.debug("saving key statistics failed: %s", exc)

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self._stats_stop.set()
        if self.replica is not None:
            if self.replica.active:
                try:
                    self.replica.save_stats(self.index)
                except Exception as exc:  # noqa: BLE001
                    log.debug("saving key statistics failed: %s", exc)
            self.replica.stop()
        self.placement.stop()
        if self._health_server is not None:
            self._health_server.stop(0)
        if self._server is not None:
            self._server.stop(grace_s).wait()
        for client in self._node_clients.values():
            client.close()
        log.info("controller stopped")

    @property
    def address(self) -> str:
        return f"{self.config.controller.host}:{self.port}"

    def node_client(self, record: NodeRecord):
        """A cached data-plane link for forwarding deletes and moves (with ``auth.admin_token``: nodes accept these
        for any tenant from admin tokens only)."""
        with self._lock:
            client = self._node_clients.get(record.node_id)
            if client is None or client.address != record.address:
                client = NodeLink(record.address, token=self.admin_token, timeout_s=5.0, tls=self.config.tls)
                self._node_clients[record.node_id] = client
            return client

    def evict(self, keys: list[str]) -> int:
        """Delete ``keys`` on every node that holds them, then forget them."""
        for node_id, node_keys in self.index.holders(keys).items():
            record = self.index.nodes.get(node_id)
            if record is None:
                continue
            try:
                self.node_client(record).delete_many(node_keys)
            except Unavailable as exc:
                log.warning("evict on node %s failed: %s", node_id, exc)
        self.metrics.evicted_keys.inc(len(keys))
        if self.replica is not None:
            try:
                self.replica.forget(list(keys))
            except Exception as exc:  # noqa: BLE001 - statistics are a cache; pins of evicted keys are moot
                log.warning("dropping evicted keys from Redis failed: %s", exc)
        return self.index.forget(keys)


class _NodeMover:
    """Carries out placement actions through the nodes' data plane (admin credentials)."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def move(self, record: NodeRecord, keys: list[str], tier: str) -> list[bool]:  # also drain promotions
        return self.c.node_client(record).move_many(keys, tier)

    def delete(self, record: NodeRecord, keys: list[str]) -> list[bool]:
        return self.c.node_client(record).delete_many(keys)


def _tiers(usage) -> list[tuple[str, int, int]]:
    return [(t.kind, t.capacity_bytes, t.used_bytes) for t in usage]


class ControlServicer(control_pb2_grpc.ControlServicer):
    """Converts control-plane messages to controller/index calls."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def _caller(self, context) -> Principal:
        if not self.c.serving:
            raise Unavailable(f"standby controller replica; active: {self.c.replica.holder() or 'none yet'}")
        principal = self.c.auth.from_metadata(context.invocation_metadata())
        self.c.rate.admit(principal)
        return principal

    def _principal(self, context) -> Principal:
        """A tenant or an operator (calls on tenant data; storage-node tokens are refused)."""
        return self._caller(context).require_tenant_or_admin()

    def _admin(self, context) -> Principal:
        return self._caller(context).require_admin()

    def _node(self, context, node_id: str) -> Principal:
        return self._caller(context).require_node(node_id)

    def _tenant_count(self, principal: Principal, **deltas: int) -> None:
        if principal.admin:
            return
        with self.c._lock:
            counts = self.c.tenant_counters.setdefault(principal.tenant, {"lookups": 0, "lookup_keys": 0,
                                                                          "lookup_hits": 0})
            for name, value in deltas.items():
                counts[name] += value

    def _tenant_usage(self, tenant: str) -> tuple[int, int, dict[str, dict[str, int]], dict[str, int]]:
        """The tenant's (keys, bytes, node_id -> tier -> bytes, node_id -> objects) from the index."""
        index = self.c.index
        prefix = tenant + "/"
        keys = nbytes = 0
        per_tier: dict[str, dict[str, int]] = {}
        objects: dict[str, int] = {}
        with index._lock:
            for key, holders in index._where.items():
                if not key.startswith(prefix):
                    continue
                keys += 1
                stats = index.stats.get(key)
                nbytes += stats.size if stats else 0
                for node_id, tiers in holders.items():
                    objects[node_id] = objects.get(node_id, 0) + 1
                    node_tiers = per_tier.setdefault(node_id, {})
                    for tier, size in tiers.items():
                        node_tiers[tier] = node_tiers.get(tier, 0) + size
        return keys, nbytes, per_tier, objects

    def _shared(self, op: str, keys: list[str]) -> None:
        """Write pins through to Redis before acknowledging them (a failover keeps every acknowledged pin)."""
        try:
            getattr(self.c.replica, op)(keys)
        except Exception as exc:  # noqa: BLE001 - redis errors are not KDN errors
            raise Unavailable(f"{op} not recorded: Redis unreachable ({exc})") from exc

    @staticmethod
    def _keys(keys) -> list[str]:
        if len(keys) > MAX_KEYS_PER_CALL:
            raise InvalidRequest(f"at most {MAX_KEYS_PER_CALL} keys per call")
        return list(keys)

    @servicer_method
    def RegisterNode(self, request, context):  # noqa: N802
        self._node(context, request.node.node_id)
        n = request.node
        if not n.node_id or not n.address:
            raise InvalidRequest("node_id and address are required")
        self.c.node_states.check_register(n.node_id, n.epoch)
        self.c.index.register(NodeRecord(n.node_id, n.address, n.bulk_address, n.epoch, _tiers(n.tiers)))
        log.info("node %s registered at %s (epoch %x)", n.node_id, n.address, n.epoch)
        return control_pb2.RegisterNodeReply(heartbeat_interval_s=self.c.config.node.heartbeat_interval_s,
                                             placement_managed=self.c.cost_driven)

    @servicer_method
    def Heartbeat(self, request, context):  # noqa: N802
        self._node(context, request.node_id)
        known = self.c.index.heartbeat(request.node_id, request.epoch, _tiers(request.tiers))
        copies = []
        if known and request.node_id in self.c.index.draining:
            copies = [control_pb2.CopyOrder(key=key, node_id=r.node_id, address=r.address, tier=tier)
                      for key, r, tier in self.c.drainer.orders(request.node_id)]
            self.c.metrics.drain_copies.inc(len(copies))
        return control_pb2.HeartbeatReply(known=known, copies=copies)

    @servicer_method
    def ReportInventory(self, request, context):  # noqa: N802
        self._node(context, request.node_id)
        known = self.c.index.apply(request.node_id, request.epoch, request.full,
                                   [(e.key, e.tier, e.size) for e in request.added],
                                   [(e.key, e.tier) for e in request.removed])
        self.c.metrics.index_keys.set(self.c.index.totals()[0])
        return control_pb2.InventoryAck(known=known)

    @servicer_method
    def Lookup(self, request, context):  # noqa: N802
        principal = self._principal(context)
        t0 = time.perf_counter()
        keys = self._keys(request.keys)
        visible = [k if principal.may_access(k) else "" for k in keys]
        found = self.c.index.lookup(visible, request.prefix, count=not request.probe)
        results = [control_pb2.KeyLocations(key=k, locations=[_location(loc) for loc in locs])
                   for k, locs in zip(keys, found)]
        prefix_hits = next((i for i, locs in enumerate(found) if not locs), len(found))
        hits = sum(1 for locs in found if locs)
        self.c.metrics.lookups.inc()
        self.c.metrics.lookup_keys.labels("hit").inc(hits)
        self.c.metrics.lookup_keys.labels("miss").inc(len(found) - hits)
        with self.c._lock:
            self.c.counters["lookups"] += 1
            self.c.counters["lookup_keys"] += len(keys)
            self.c.counters["lookup_hits"] += hits
        self._tenant_count(principal, lookups=1, lookup_keys=len(keys), lookup_hits=hits)
        self.c.metrics.lookup_seconds.observe(time.perf_counter() - t0)
        return control_pb2.LookupReply(results=results, prefix_hits=prefix_hits)

    @servicer_method
    def Place(self, request, context):  # noqa: N802
        principal = self._principal(context)
        keys = self._keys(request.keys)
        if len(request.sizes) not in (0, len(keys)):
            raise InvalidRequest("sizes must be empty or one per key")
        for name in ("tokens", "starts"):
            if len(getattr(request, name)) not in (0, len(keys)):
                raise InvalidRequest(f"{name} must be empty or one per key")
        sizes = list(request.sizes) or [0] * len(keys)
        allowed = [i for i, k in enumerate(keys) if principal.may_access(k)]
        chosen: list = [None] * len(keys)
        if self.c.cost_driven:
            hints = [PlaceHints(tokens=request.tokens[i] if request.tokens else 0,
                                start=request.starts[i] if request.starts else 0, model=request.model,
                                kv_bytes_per_token=request.kv_bytes_per_token) for i in allowed]
            placed = self.c.placement.place_many([keys[i] for i in allowed], [sizes[i] for i in allowed], hints)
            for i, target in zip(allowed, placed):
                chosen[i] = target
        else:
            for i in allowed:
                record = self.c.index.place(keys[i], sizes[i])
                chosen[i] = (record, "") if record is not None else None
        targets = []
        for target in chosen:
            if target is None:
                targets.append(common_pb2.Location())
                continue
            record, tier = target
            targets.append(common_pb2.Location(node_id=record.node_id, address=record.address,
                                               bulk_address=record.bulk_address, tier=tier))
        return control_pb2.PlaceReply(targets=targets)

    def _scoped(self, principal: Principal, keys, prefix: str, limit: int = MAX_KEYS_PER_CALL) -> list[str]:
        chosen = [k for k in self._keys(keys) if principal.may_access(k)]
        if prefix:
            if not principal.admin and not prefix.startswith(principal.tenant + "/"):
                prefix = f"{principal.tenant}/{prefix}"
            chosen += self.c.index.keys_with_prefix(prefix, limit)[0]
        return chosen

    @servicer_method
    def Evict(self, request, context):  # noqa: N802
        principal = self._principal(context)
        if not request.keys and not request.prefix:
            raise InvalidRequest("give keys or a prefix to evict")
        return control_pb2.EvictReply(evicted=self.c.evict(self._scoped(principal, request.keys, request.prefix)))

    @servicer_method
    def Pin(self, request, context):  # noqa: N802
        principal = self._principal(context)
        keys = self._scoped(principal, request.keys, "")
        quota = self.c.config.auth.quotas.get(principal.tenant)
        with self.c._lock:
            pinned = self.c.index.pinned
            if quota is not None and quota.pins and not principal.admin:
                held = sum(1 for k in pinned if key_tenant(k) == principal.tenant)
                new = len(set(keys) - pinned)
                if held + new > quota.pins:
                    raise CapacityError(f"tenant {principal.tenant!r} may pin at most {quota.pins} keys "
                                        f"({held} pinned, {new} more asked)")
            before = len(pinned)
            if self.c.replica is not None:
                self._shared("pin", keys)
            pinned.update(keys)
            return control_pb2.PinReply(changed=len(self.c.index.pinned) - before)

    @servicer_method
    def Unpin(self, request, context):  # noqa: N802
        keys = self._scoped(self._principal(context), request.keys, "")
        with self.c._lock:
            before = len(self.c.index.pinned)
            if self.c.replica is not None:
                self._shared("unpin", keys)
            self.c.index.pinned.difference_update(keys)
            return control_pb2.PinReply(changed=before - len(self.c.index.pinned))

    @servicer_method
    def Stats(self, request, context):  # noqa: N802
        """Cluster-wide numbers for admins; a tenant's own keys, bytes, pins and lookups for a tenant."""
        principal = self._principal(context)
        index = self.c.index
        now = time.monotonic()
        nodes = list(index.nodes.values())
        alive = sum(1 for r in nodes if index.alive(r, now))
        self.c.metrics.nodes.labels("alive").set(alive)
        self.c.metrics.nodes.labels("dead").set(len(nodes) - alive)
        self.c.metrics.nodes.labels("draining").set(sum(1 for r in nodes if r.node_id in index.draining))
        if principal.admin:
            keys, nbytes = index.totals()
            c = dict(self.c.counters)
            pinned = len(index.pinned)
        else:
            keys, nbytes, _, _ = self._tenant_usage(principal.tenant)
            with self.c._lock:
                c = dict(self.c.tenant_counters.get(principal.tenant, {}))
                pinned = sum(1 for k in index.pinned if key_tenant(k) == principal.tenant)
        return control_pb2.ControllerStats(nodes=len(nodes), alive_nodes=alive, keys=keys, bytes=nbytes,
                                           lookups=c.get("lookups", 0), lookup_keys=c.get("lookup_keys", 0),
                                           lookup_hits=c.get("lookup_hits", 0), pinned=pinned,
                                           uptime_s=now - self.c.started_at)

    @servicer_method
    def ListNodes(self, request, context):  # noqa: N802
        """Every node's addresses (clients need them); used bytes and objects: all of them for admins, the
        caller's own for a tenant."""
        principal = self._principal(context)
        index = self.c.index
        now = time.monotonic()
        own = None if principal.admin else self._tenant_usage(principal.tenant)
        return control_pb2.ListNodesReply(nodes=[self._node_info(r, own, now)
                                                 for r in sorted(index.nodes.values(), key=lambda r: r.node_id)])

    def _node_info(self, r: NodeRecord, own, now: float) -> common_pb2.NodeInfo:
        """One node as ListNodes shows it (``own``: a tenant's usage, None for an admin)."""
        index = self.c.index
        if own is None:
            tiers = [common_pb2.TierUsage(kind=k, capacity_bytes=c, used_bytes=u) for k, c, u in r.tiers]
            objects = len(index._node_keys.get(r.node_id, ()))
        else:
            used = own[2].get(r.node_id, {})
            tiers = [common_pb2.TierUsage(kind=k, capacity_bytes=c, used_bytes=used.get(k, 0))
                     for k, c, _ in r.tiers]
            objects = own[3].get(r.node_id, 0)
        draining = r.node_id in index.draining
        return common_pb2.NodeInfo(
            node_id=r.node_id, address=r.address, bulk_address=r.bulk_address, epoch=r.epoch, tiers=tiers,
            alive=index.alive(r, now), heartbeat_age_s=now - r.last_seen, objects=objects, draining=draining,
            drain_pending=self.c.drainer.pending(r.node_id) if draining and own is None else 0)

    @servicer_method
    def DrainNode(self, request, context):  # noqa: N802
        """Admin: start (or with ``undo`` end) draining a registered node."""
        self._admin(context)
        record = self.c.index.nodes.get(request.node_id)
        if record is None:
            raise NotFound(f"no node {request.node_id!r} is registered")
        self.c.node_states.set_draining(record.node_id, not request.undo)
        log.info("node %s %s", record.node_id, "no longer draining" if request.undo else "draining")
        return control_pb2.DrainNodeReply(node=self._node_info(record, None, time.monotonic()))

    @servicer_method
    def RemoveNode(self, request, context):  # noqa: N802
        """Admin: forget a dead or drained node (``force``: any) and its locations; tombstone its epoch."""
        self._admin(context)
        record = self.c.drainer.removable(request.node_id, request.force)
        view = self.c.index.drain_view(record.node_id)
        self.c.node_states.set_removed(record.node_id, record.epoch)
        self.c.index.remove_node(record.node_id)
        self.c.drainer.forget(record.node_id)
        lost = sum(1 for *_, others in view if not others)
        log.warning("node %s removed by an operator: %d locations dropped, %d keys without another copy",
                    record.node_id, len(view), lost)
        return control_pb2.RemoveNodeReply(locations=len(view), lost=lost)

    @servicer_method
    def ListKeys(self, request, context):  # noqa: N802
        principal = self._principal(context)
        limit = request.limit or 1000
        prefix = request.prefix
        if not principal.admin and not prefix.startswith(principal.tenant + "/"):
            prefix = f"{principal.tenant}/{prefix}"
        keys, truncated = self.c.index.keys_with_prefix(prefix, limit)
        now = time.time()
        out = []
        for key in keys:
            stats = self.c.index.stats.get(key)
            out.append(control_pb2.KeyInfo(
                key=key, locations=[_location(loc) for loc in self.c.index.locations(key)],
                pinned=key in self.c.index.pinned, size=stats.size if stats else 0,
                lookups=stats.lookups if stats else 0,
                last_access_age_s=now - stats.last_access if stats else 0.0))
        return control_pb2.ListKeysReply(keys=out, truncated=truncated)

    @servicer_method
    def Explain(self, request, context):  # noqa: N802
        principal = self._principal(context)
        out = []
        for key in self._keys(request.keys):
            # another tenant's key is explained exactly like an absent one ("" is never in the index)
            data = self.c.placement.explain(key if principal.may_access(key) else "", self.c.config.placement.policy)
            data["key"] = key
            tiers = [control_pb2.TierValue(**t) for t in data.pop("tiers")]
            out.append(control_pb2.KeyExplanation(tiers=tiers, **data))
        return control_pb2.ExplainReply(keys=out)

    @servicer_method
    def PutProfile(self, request, context):  # noqa: N802
        self._admin(context)
        return control_pb2.PutProfileReply(profile_id=self.c.profiles.put(request.profile, list(request.fingerprints)))

    @servicer_method
    def GetProfile(self, request, context):  # noqa: N802
        self._principal(context)
        found = self.c.profiles.get(request.profile_id, request.fingerprint)
        if found is None:
            return control_pb2.GetProfileReply(found=False)
        pid, data = found
        return control_pb2.GetProfileReply(found=True, profile_id=pid,
                                           profile=b"" if request.have_id == pid else data)
