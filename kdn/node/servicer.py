"""The storage node: owns a node's tiers, serves the data plane (gRPC and the bulk channel), reports to the
controller, and keeps serving when the controller is away. The standard gRPC health service runs on the main port
(and alone on ``node.health_port``): liveness ``""``, readiness ``kdn.v1.Data`` (:mod:`kdn.node.health`)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence

from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CollectorRegistry

from kdn.config import KDNConfig
from kdn.errors import CapacityError, ConfigError, CorruptObject, InvalidRequest, PermissionDenied
from kdn.format.chunk import parse_header, verify_object
from kdn.format.keys import ChunkKey
from kdn.format.mac import load_keyring
from kdn.metrics import NodeMetrics
from kdn.node.controller_link import ControllerLink
from kdn.node.health import NodeHealth
from kdn.node.quota import TierQuotas, put_within_quota
from kdn.node.tier_stack import TierStack
from kdn.node.tiers import build_tier
from kdn.node.tiers.base import Buffer
from kdn.v1 import common_pb2, data_pb2, data_pb2_grpc
from kdn.wire.auth import Authenticator, Principal, RateLimiter
from kdn.wire.budget import InflightBudget
from kdn.wire.rpc import DEFAULT_FRAME_BYTES, abort, create_server, servicer_method, ssl_context

__all__ = ["StorageNode"]

log = logging.getLogger(__name__)

MAX_REPORTED_KEYS = 4096
PUT_STREAM_FLUSH_BYTES = 256 << 20
"""A gRPC put stream hands its complete objects to the tiers whenever this many bytes have arrived."""


class StorageNode:
    """Tiers + data-plane servers + controller link. ``start()`` binds the ports; ``stop()`` shuts down."""

    def __init__(self, config: KDNConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.node_id = config.node_id()
        self.epoch = secrets.randbits(62) or 1
        self.auth = Authenticator(config.auth.tokens)
        self.rate = RateLimiter({t: q.requests_per_s for t, q in config.auth.quotas.items()})
        self.quotas = TierQuotas(config.auth.quotas)
        self.keyring = load_keyring(config.security)  # with keys: unsigned or forged puts are refused
        self.metrics = NodeMetrics(registry or CollectorRegistry())
        self.counters = {"gets": 0, "get_hits": 0, "puts": 0, "bytes_out": 0, "bytes_in": 0, "corrupt": 0}
        self._lock = threading.Lock()
        self.started_at = time.monotonic()
        # Put bytes received and not yet stored, per tenant and in total (bulk channel and gRPC Put share it).
        self.inflight = InflightBudget(config.node.tenant_inflight_bytes, config.node.max_inflight_bytes)
        os.makedirs(config.data_dir, exist_ok=True)
        tiers = [self._build_tier(spec) for spec in config.node.tiers]
        self.link = ControllerLink(self, config) if config.node.controller else None
        self.store = TierStack(tiers, config.node.write_policy, on_change=self._changed, keyring=self.keyring,
                               on_bad=self._bad_copy_dropped)
        self.quotas.changed(self.store.inventory() if self.quotas.active else [], [])
        self.health = NodeHealth(self.store.tiers, self.link.registered_now if self.link is not None else None)
        self.health_port = -1
        self._health_server = None
        self.grpc_port = 0
        self.bulk_port = -1
        self._server = None
        self._bulk = None
        self._shm = None

    def _build_tier(self, spec):
        """The tier of ``spec``; the ``memory`` tier lives in a shared arena when ``node.shared_memory`` is on."""
        if spec.kind == "memory" and self.config.node.shared_memory:
            from kdn.node.tiers.shared import shared_tier_or_none

            tier = shared_tier_or_none(spec.config.capacity)
            if tier is not None:
                return tier
        if spec.kind == "disk":  # its start-up check needs the keyring and the object size limit
            from kdn.node.tiers.disk import DiskTier

            return DiskTier.from_config(spec.config, self.config.data_dir, keyring=self.keyring,
                                        max_object_bytes=self.config.node.max_object_bytes)
        return build_tier(spec.kind, spec.config, self.config.data_dir)

    # -- addresses -------------------------------------------------------------------------------------------
    @property
    def advertise_host(self) -> str:
        return self.config.node.advertise_host or self.config.node.host

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.grpc_port}"

    @property
    def bulk_address(self) -> str:
        port = self.config.node.advertise_bulk_port or self.bulk_port
        return f"{self.advertise_host}:{port}" if self.bulk_port > 0 else ""

    def info(self) -> common_pb2.NodeInfo:
        usage = [common_pb2.TierUsage(kind=t.kind, capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes)
                 for t in self.store.tiers]
        for tier in self.store.tiers:
            self.metrics.tier_used.labels(tier.kind).set(tier.used_bytes)
            self.metrics.tier_capacity.labels(tier.kind).set(tier.capacity_bytes)
        return common_pb2.NodeInfo(node_id=self.node_id, address=self.address, bulk_address=self.bulk_address,
                                   epoch=self.epoch, tiers=usage, alive=True)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> StorageNode:
        cfg = self.config.node
        self._server, self.grpc_port = create_server(cfg.host, cfg.port, tls=self.config.tls)
        if not cfg.node_id:
            self.node_id = f"{socket.gethostname()}:{self.grpc_port}"
        data_pb2_grpc.add_DataServicer_to_server(DataServicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._server)
        self._server.start()
        if cfg.health_port >= 0:  # health only, no TLS: it answers SERVING / NOT_SERVING and nothing else
            self._health_server, self.health_port = create_server(cfg.host, cfg.health_port, workers=2)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_server)
            self._health_server.start()
        if cfg.bulk_port >= 0:
            from kdn.wire.bulk_server import BulkServer
            from kdn.wire.schedule import TransferScheduler

            sends = TransferScheduler(cfg.send_policy, cfg.send_aging, slots=cfg.send_slots) if cfg.send_slots > 0 \
                else None
            self._bulk = BulkServer(cfg.host, cfg.bulk_port, self, max_object_bytes=cfg.max_object_bytes,
                                    ssl_context=ssl_context(self.config.tls, server=True), link_gbps=cfg.link_gbps,
                                    inflight=self.inflight, send_scheduler=sends)
            try:
                self.bulk_port = self._bulk.start()
            except OSError as exc:
                self._server.stop(0)
                raise ConfigError(f"cannot bind the bulk channel to {cfg.host}:{cfg.bulk_port}: {exc}") from exc
        self._start_shm()
        log.info("node %s serving gRPC on %s, bulk on %s", self.node_id, self.address, self.bulk_address or "-")
        if self.link is not None:
            self.link.start()
        self.health.start()
        return self

    def _start_shm(self) -> None:
        """Serve same-host clients from the shared memory tier (see :mod:`kdn.wire.shm`), when there is one."""
        from kdn.node.tiers.shared import SharedMemoryTier
        from kdn.wire.shm import ShmServer, socket_name

        tier = next((t for t in self.store.tiers if isinstance(t, SharedMemoryTier)), None)
        if tier is None:
            return
        try:
            self._shm = ShmServer(socket_name(self.address), tier, self).start()
        except OSError as exc:
            log.warning("shared memory channel %s not served: %s", socket_name(self.address), exc)

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.stop()
        if self.link is not None:
            self.link.stop()
        if self._shm is not None:
            self._shm.stop()
        if self._bulk is not None:
            self._bulk.stop(grace_s)
        if self._health_server is not None:
            self._health_server.stop(0)
        if self._server is not None:
            self._server.stop(grace_s).wait()
        self.store.close()
        log.info("node %s stopped", self.node_id)

    # -- inventory -------------------------------------------------------------------------------------------
    def _changed(self, added: list[tuple[str, str, int]], removed: list[tuple[str, str]]) -> None:
        self.quotas.changed(added, removed)
        if self.link is not None:
            self.link.report(added, removed)

    # -- operations shared by gRPC and the bulk channel (the BulkHandler protocol) --------------------------
    def authenticate(self, token: str, tenant: str) -> Principal:
        """The caller of a data-plane call or connection; storage-node tokens are refused (they carry no data)."""
        return self.auth.authenticate(token, tenant).require_tenant_or_admin()

    def _bad_copy_dropped(self) -> None:
        """A tier, a get's header check or a scrub dropped a bad (corrupt or forged) copy: count it."""
        self._count(corrupt=1)
        self.metrics.corrupt.inc()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                self.counters[name] += value

    def get_many(self, principal: Principal, keys: Sequence[str], transport: str = "bulk") -> list[Buffer | None]:
        """Objects for keys the caller may see; misses (and other tenants' keys) are ``None``."""
        out, leases = self._get(principal, keys, transport, leased=False)
        return out

    def get_leased(self, principal: Principal, keys: Sequence[str]) -> tuple[list[Buffer | None], Callable[[], None]]:
        """:meth:`get_many` for the bulk channel: objects in the top memory tier are views of it (no copy), valid
        until the returned ``release()`` is called."""
        out, leases = self._get(principal, keys, "bulk", leased=True)

        def release() -> None:
            for lease in leases:
                lease.release()
        return out, release

    def _get(self, principal: Principal, keys: Sequence[str], transport: str, leased: bool) -> tuple[list, list]:
        self.metrics.requests.labels("get", transport).inc()
        self.rate.admit(principal)
        allowed = [i for i, k in enumerate(keys) if principal.may_access(k)]
        wanted = [keys[i] for i in allowed]
        found, leases = self.store.get_leased(wanted) if leased else (self.store.get_many(wanted), [])
        out: list[Buffer | None] = [None] * len(keys)
        for i, item in zip(allowed, found):
            if item is not None:
                out[i] = item[0]
        self.account_get(transport, len(keys), sum(1 for d in out if d is not None),
                         sum(len(d) for d in out if d is not None), count_request=False)
        return out, leases

    def account_get(self, transport: str, keys: int, hits: int, nbytes: int, count_request: bool = True) -> None:
        """Count a served get (also the shared-memory leases of :mod:`kdn.wire.shm`)."""
        if count_request:
            self.metrics.requests.labels("get", transport).inc()
        self._count(gets=keys, get_hits=hits, bytes_out=nbytes)
        self.metrics.objects.labels("get", "hit").inc(hits)
        self.metrics.objects.labels("get", "miss").inc(keys - hits)
        self.metrics.bytes.labels("out").inc(nbytes)

    def check_object(self, principal: Principal, key: str, data: Buffer) -> None:
        """Raise unless ``data`` is an intact object of ``key`` that the caller may store."""
        ChunkKey.parse(key)
        if not (principal.may_access(key) or principal.node):  # node principals: only via Replicate (drain)
            raise InvalidRequest("key outside the caller's tenant")
        if len(data) > self.config.node.max_object_bytes:
            raise InvalidRequest(f"object of {len(data)} bytes exceeds max_object_bytes")
        verify_object(data, key=key, keyring=self.keyring)

    def put_many(self, principal: Principal, items: Sequence[tuple[str, Buffer]],
                 transport: str = "bulk", tier: str = "") -> list[tuple[bool, str]]:
        self.metrics.requests.labels("put", transport).inc()
        self.rate.admit(principal)
        results: list[tuple[bool, str]] = [(False, "")] * len(items)
        good: list[int] = []
        for i, (key, data) in enumerate(items):
            try:
                self.check_object(principal, key, data)
                good.append(i)
            except (InvalidRequest, CorruptObject) as exc:
                if isinstance(exc, CorruptObject):
                    self._count(corrupt=1)
                    self.metrics.corrupt.inc()
                results[i] = (False, str(exc))
        outcomes = put_within_quota(self.store, self.quotas, [items[i] for i in good], tier)
        stored = [ok for ok, _ in outcomes]
        if self.link is not None and any(stored):
            self.link.sync()
        for i, outcome in zip(good, outcomes):
            results[i] = outcome
        nbytes = sum(len(items[i][1]) for i, ok in zip(good, stored) if ok)
        self._count(puts=len(items), bytes_in=nbytes)
        self.metrics.objects.labels("put", "stored").inc(sum(stored))
        self.metrics.bytes.labels("in").inc(nbytes)
        return results

    def contains_many(self, principal: Principal, keys: Sequence[str]) -> list[str]:
        self.rate.admit(principal)
        allowed = [i for i, k in enumerate(keys) if principal.may_access(k)]
        located = self.store.locate_many([keys[i] for i in allowed])
        out = [""] * len(keys)
        for i, tier in zip(allowed, located):
            out[i] = tier
        return out

    def move_many(self, principal: Principal, keys: Sequence[str], tier: str) -> list[bool]:
        """Move keys the caller may see; a move into a tier over the key's tenant's byte quota is refused."""
        self.rate.admit(principal)
        allowed = [i for i, k in enumerate(keys) if principal.may_access(k) and self.quotas.room_for_move(k, tier)]
        moved = self.store.move_many([keys[i] for i in allowed], tier)
        out = [False] * len(keys)
        for i, ok in zip(allowed, moved):
            out[i] = ok
        if self.link is not None and any(moved):
            self.link.sync()
        return out

    def report_bad(self, principal: Principal, keys: Sequence[str]) -> list[bool]:
        """A client got bad copies of ``keys`` from this node: verify every copy held (the caller's keys only) and
        drop the bad ones; per key True when one was dropped. The removals reach the controller at once."""
        self.rate.admit(principal)
        allowed = [i for i, k in enumerate(keys) if principal.may_access(k)]
        dropped = self.store.scrub([keys[i] for i in allowed])
        out = [False] * len(keys)
        for i, ok in zip(allowed, dropped):
            out[i] = ok
        if any(dropped):  # counted by the tier stack (on_bad)
            if self.link is not None:
                self.link.sync()
        log.info("bad copies reported for %d keys: %d dropped", len(keys), sum(dropped))
        return out

    def delete_many(self, principal: Principal, keys: Sequence[str]) -> list[bool]:
        self.rate.admit(principal)
        allowed = [i for i, k in enumerate(keys) if principal.may_access(k)]
        deleted = self.store.delete_many([keys[i] for i in allowed])
        out = [False] * len(keys)
        for i, ok in zip(allowed, deleted):
            out[i] = ok
        return out


def object_frames(data: Buffer, max_frame: int) -> list[tuple[int, int]]:
    """Frame boundaries ``(offset, length)``: the header, then each section, large ones split at ``max_frame``."""
    try:
        header = parse_header(data)
        cuts = [0, header.header_len] + [s.offset + s.length for s in header.sections]
    except CorruptObject:
        cuts = [0]
    if cuts[-1] != len(data):
        cuts.append(len(data))
    frames = []
    for start, end in zip(cuts, cuts[1:]):
        for off in range(start, end, max_frame):
            frames.append((off, min(max_frame, end - off)))
    return frames or [(0, 0)]


class DataServicer(data_pb2_grpc.DataServicer):
    """Converts data-plane messages to node calls."""

    def __init__(self, node: StorageNode) -> None:
        self.node = node

    def _principal(self, context) -> Principal:
        return self.node.auth.from_metadata(context.invocation_metadata()).require_tenant_or_admin()

    def Get(self, request, context):  # noqa: N802 - gRPC method name
        try:
            objects = self.node.get_many(self._principal(context), list(request.keys), transport="grpc")
        except Exception as exc:  # noqa: BLE001
            abort(context, exc, "Get")
        max_frame = request.max_frame_bytes or DEFAULT_FRAME_BYTES
        max_frame = max(64 << 10, min(max_frame, DEFAULT_FRAME_BYTES * 4))
        for index, data in enumerate(objects):
            if data is None:
                yield data_pb2.GetFrame(index=index, found=False)
                continue
            view = memoryview(data)
            for offset, length in object_frames(data, max_frame):
                yield data_pb2.GetFrame(index=index, found=True, total_size=len(data), offset=offset,
                                        data=bytes(view[offset:offset + length]))

    def Put(self, request_iterator, context):  # noqa: N802
        """Objects are received as their frames arrive (never allocated from ``total_size``), the bytes held are
        charged to the node's in-flight budget (refused at once past the tenant's or the node's limit), and
        complete objects go to the tiers every ``PUT_STREAM_FLUSH_BYTES``."""
        try:
            principal = self._principal(context)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc, "Put")
        return self._receive(principal, request_iterator, context)

    def Replicate(self, request_iterator, context):  # noqa: N802
        """``Put`` for a storage node pushing copies the controller ordered (a drain): node tokens and admins."""
        try:
            principal = self.node.auth.from_metadata(context.invocation_metadata())
            if not (principal.node or principal.admin):
                raise PermissionDenied("Replicate is for storage nodes")
        except Exception as exc:  # noqa: BLE001
            abort(context, exc, "Replicate")
        return self._receive(principal, request_iterator, context)

    def _receive(self, principal: Principal, request_iterator, context):
        limit = self.node.config.node.max_object_bytes
        results: list[data_pb2.PutResult] = []  # one per object, in arrival order
        batch: list[tuple[int, str, bytearray, str]] = []
        reservation = self.node.inflight.reservation(principal.tenant)
        tier = ""
        buf: bytearray | None = None
        key, total, batch_bytes = "", 0, 0

        def fail(error: str) -> None:
            results[-1].error = error

        def flush() -> None:
            for hint in sorted({t for *_, t in batch}):
                group = [b for b in batch if b[3] == hint]
                try:
                    outcomes = self.node.put_many(principal, [(k, d) for _, k, d, _ in group], transport="grpc",
                                                  tier=hint)
                except Exception as exc:  # noqa: BLE001 - e.g. the tenant's request rate
                    abort(context, exc, "Put")
                for (index, *_), (ok, err) in zip(group, outcomes):
                    results[index].stored = ok
                    results[index].error = err
            batch.clear()
            reservation.release()  # the tiers own those bytes now

        try:
            for frame in request_iterator:
                if frame.offset == 0 and (buf is None or frame.key != key or not buf):
                    if buf is not None:
                        fail("incomplete object")
                        reservation.release(len(buf))
                    key, total, buf, tier = frame.key, frame.total_size, None, frame.tier
                    results.append(data_pb2.PutResult(key=key, stored=False))
                    if total > limit:
                        fail("object exceeds max_object_bytes")
                        continue
                    buf = bytearray()
                if buf is None:
                    continue
                n = len(frame.data)
                if frame.key != key or frame.offset != len(buf) or len(buf) + n > total:
                    fail("out-of-order frame")
                    reservation.release(len(buf))
                    buf = None
                    continue
                try:
                    reservation.charge(n)
                except CapacityError as exc:
                    fail(str(exc))
                    reservation.release(len(buf))
                    buf = None
                    continue
                buf += frame.data
                if len(buf) == total:
                    batch.append((len(results) - 1, key, buf, tier))
                    batch_bytes += total
                    buf = None
                    if batch_bytes >= PUT_STREAM_FLUSH_BYTES:
                        flush()
                        batch_bytes = 0
            if not context.is_active():  # gRPC ended the call (a frame it could not parse, a cancel): answer
                return None              # nothing; a reply here would leave the call unfinished (stop() hangs)
            if buf is not None:
                fail("incomplete object")
            flush()
        finally:
            reservation.release()
        return data_pb2.PutReply(results=results)

    @servicer_method
    def Contains(self, request, context):  # noqa: N802
        tiers = self.node.contains_many(self._principal(context), list(request.keys))
        return data_pb2.ContainsReply(present=[bool(t) for t in tiers], tier=tiers)

    @servicer_method
    def Move(self, request, context):  # noqa: N802
        return data_pb2.MoveReply(moved=self.node.move_many(self._principal(context), list(request.keys),
                                                            request.tier))

    @servicer_method
    def ReportBad(self, request, context):  # noqa: N802
        keys = list(request.keys)
        if len(keys) > MAX_REPORTED_KEYS:
            raise InvalidRequest(f"at most {MAX_REPORTED_KEYS} keys per report")
        return data_pb2.ReportBadReply(dropped=self.node.report_bad(self._principal(context), keys))

    @servicer_method
    def Delete(self, request, context):  # noqa: N802
        return data_pb2.DeleteReply(deleted=self.node.delete_many(self._principal(context), list(request.keys)))

    @servicer_method
    def Stats(self, request, context):  # noqa: N802
        self._principal(context).require_admin()  # node-wide counters: operators only
        node = self.node
        info = node.info()
        info.objects = sum(1 for _ in node.store.inventory())
        c = node.counters
        return data_pb2.NodeStats(node=info, gets=c["gets"], get_hits=c["get_hits"], puts=c["puts"],
                                  bytes_out=c["bytes_out"], bytes_in=c["bytes_in"], corrupt_dropped=c["corrupt"],
                                  controller_connected=bool(node.link and node.link.connected),
                                  uptime_s=time.monotonic() - node.started_at)
