"""A storage node's link to the controller: registration, heartbeats and inventory reports.

Runs in one background thread. When the controller is unreachable the node keeps serving; changes pile up (bounded)
and are sent when it is back, or replaced by a full inventory report when too many piled up or when the controller
does not know the node (it restarted).

A lost controller is noticed at once, not at the next heartbeat: the link watches its channel's connectivity and
wakes when an established connection breaks; while the controller is unreachable it retries with a short
exponential backoff (``RETRY_MIN_S`` doubling up to ``RETRY_MAX_S``, never past the heartbeat interval), and the
channel's own reconnect backoff is capped likewise. A restarted controller is thus re-registered with and sent the
full inventory within about ``RETRY_MAX_S`` of answering (docs/operations.md, "Restarts").

Replicas: ``node.controller`` may list several controllers (``"a:7070,b:7070"``). When the current one is
unreachable or a standby (UNAVAILABLE), the link moves to the next at once, registers there and sends its full
inventory (the new active replica starts with an empty index).

Drain (docs/operations.md, "Draining and removing a node"): a heartbeat reply may carry copy orders; the
:class:`_Copier` thread pushes each ordered object from this node's tiers to the named node's ``Data.Replicate``
with the node's token, and the target's inventory report tells the controller the copy exists.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

import grpc

from kdn.v1 import control_pb2, control_pb2_grpc, data_pb2, data_pb2_grpc
from kdn.wire.auth import call_metadata
from kdn.wire.rpc import make_channel

if TYPE_CHECKING:
    from kdn.config import KDNConfig
    from kdn.node.servicer import StorageNode

__all__ = ["ControllerLink"]

log = logging.getLogger(__name__)

MAX_PENDING = 200_000
BATCH = 5_000
RETRY_MIN_S = 0.05
"""First retry after a failed call to the controller."""
RETRY_MAX_S = 0.5
"""Longest wait between retries while the controller is unreachable (at most the heartbeat interval)."""
COPY_QUEUE = 20_000
"""Most copy orders queued on the node (more are dropped; the controller orders them again)."""
COPY_BATCH_BYTES = 64 << 20
"""Object bytes pushed per Replicate call."""
COPY_FRAME_BYTES = 4 << 20
COPY_TIMEOUT_S = 120.0
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", int(RETRY_MIN_S * 1000)),
                    ("grpc.min_reconnect_backoff_ms", int(RETRY_MIN_S * 1000)),
                    ("grpc.max_reconnect_backoff_ms", int(RETRY_MAX_S * 1000))]


class ControllerLink:
    def __init__(self, node: StorageNode, config: KDNConfig) -> None:
        self.node = node
        self.addresses = [a.strip() for a in config.node.controller.split(",") if a.strip()]
        self._current = 0
        self.interval = config.node.heartbeat_interval_s
        self.metadata = call_metadata(config.node.token)
        self.timeout = max(1.0, self.interval * 2)
        self.connected = False
        self._registered = False
        self._need_full = True
        self._pending: deque[tuple[bool, control_pb2.InventoryEntry]] = deque()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdn-controller-link", daemon=True)
        self._channels = [make_channel(a, config.tls, _CHANNEL_OPTIONS) for a in self.addresses]
        self._stubs = [control_pb2_grpc.ControlStub(c) for c in self._channels]
        self._watchers = [self._watcher(i) for i in range(len(self._channels))]
        self.copier = _Copier(node, config, self.metadata)

    def registered_now(self) -> bool:
        """Whether the controller in use knows this node (registered, and its last call succeeded)."""
        return self.connected and self._registered

    def _watcher(self, index: int):
        """A connectivity callback for channel ``index``: wakes the link when the connection it uses breaks."""
        def changed(state: grpc.ChannelConnectivity) -> None:
            lost = state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.IDLE,
                             grpc.ChannelConnectivity.SHUTDOWN)
            if lost and index == self._current and self.connected and not self._stop.is_set():
                self._wake.set()
        return changed

    @property
    def address(self) -> str:
        """The controller the link talks to now."""
        return self.addresses[self._current]

    @property
    def _stub(self):
        return self._stubs[self._current]

    def start(self) -> None:
        for channel, watcher in zip(self._channels, self._watchers):
            channel.subscribe(watcher, try_to_connect=False)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.copier.stop()
        for channel, watcher in zip(self._channels, self._watchers):
            channel.unsubscribe(watcher)
            channel.close()

    def report(self, added: list[tuple[str, str, int]], removed: list[tuple[str, str]]) -> None:
        """Queue inventory changes (called from tier operations; never blocks on the network)."""
        with self._lock:
            if self._need_full:
                return
            for key, tier, size in added:
                self._pending.append((True, control_pb2.InventoryEntry(key=key, tier=tier, size=size)))
            for key, tier in removed:
                self._pending.append((False, control_pb2.InventoryEntry(key=key, tier=tier)))
            if len(self._pending) > MAX_PENDING:
                self._pending.clear()
                self._need_full = True
        self._wake.set()

    def sync(self) -> None:
        """Send queued changes now, in the caller's thread (read-your-writes for puts); never raises."""
        if not (self.connected and self._registered):
            self._wake.set()
            return
        try:
            with self._send_lock:
                self._flush()
        except grpc.RpcError as exc:
            log.debug("inventory sync failed: %s", exc.code().name)
            self._wake.set()

    def _run(self) -> None:
        failed = 0  # addresses tried in a row without success
        retry = RETRY_MIN_S  # the wait after a failed round; doubles up to RETRY_MAX_S (or the interval)
        while not self._stop.is_set():
            wait = self.interval
            try:
                with self._send_lock:
                    self._step()
                self._set_connected(True)
                failed, retry = 0, RETRY_MIN_S
            except grpc.RpcError as exc:
                if self.connected:
                    log.warning("controller %s unreachable: %s %s", self.address, exc.code().name,
                                exc.details() if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else "")
                self._set_connected(False)
                self._registered = False
                if len(self.addresses) > 1:
                    with self._send_lock:
                        self._current = (self._current + 1) % len(self.addresses)
                    failed += 1
                    if failed < len(self.addresses):
                        continue  # the next replica at once; after a full round, back off
                    failed = 0
                wait = min(retry, RETRY_MAX_S, self.interval)
                retry *= 2
            except Exception:  # noqa: BLE001 - keep the link alive whatever happens
                log.exception("controller link error")
            self._wake.wait(wait)
            self._wake.clear()

    def _set_connected(self, value: bool) -> None:
        if value and not self.connected:
            log.info("connected to controller %s", self.address)
        self.connected = value
        self.node.metrics.controller_up.set(1 if value else 0)

    def _step(self) -> None:
        node = self.node
        if not self._registered:
            reply = self._stub.RegisterNode(control_pb2.RegisterNodeRequest(node=node.info()), timeout=self.timeout,
                                            metadata=self.metadata)
            node.store.promote_on_hit = not reply.placement_managed  # the controller moves objects itself
            self._registered = True
            with self._lock:
                self._need_full = True
        else:
            reply = self._stub.Heartbeat(control_pb2.HeartbeatRequest(
                node_id=node.node_id, epoch=node.epoch, tiers=node.info().tiers), timeout=self.timeout,
                metadata=self.metadata)
            if not reply.known:
                self._registered = False
                self._step()
                return
            if reply.copies:
                self.copier.submit(reply.copies)
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            full = self._need_full
            if full:
                self._pending.clear()
                self._need_full = False
        if full:
            entries = [control_pb2.InventoryEntry(key=k, tier=t, size=s) for k, t, s in self.node.store.inventory()]
            try:
                for start in range(0, max(len(entries), 1), BATCH):
                    self._send(start == 0, entries[start:start + BATCH], [])
            except grpc.RpcError:
                with self._lock:
                    self._need_full = True
                raise
        while True:
            with self._lock:
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            if not batch:
                return
            try:
                self._send(False, [e for a, e in batch if a], [e for a, e in batch if not a])
            except grpc.RpcError:
                with self._lock:
                    self._pending.extendleft(reversed(batch))
                raise

    def _send(self, full: bool, added: list, removed: list) -> None:
        ack = self._stub.ReportInventory(control_pb2.InventoryReport(
            node_id=self.node.node_id, epoch=self.node.epoch, full=full, added=added, removed=removed),
            timeout=self.timeout, metadata=self.metadata)
        if not ack.known:
            self._registered = False
            with self._lock:
                self._need_full = True


class _Copier:
    """Pushes the objects the controller ordered copied (a drain) to other nodes, in its own thread."""

    def __init__(self, node: StorageNode, config: KDNConfig, metadata) -> None:
        self.node = node
        self.tls = config.tls
        self.metadata = metadata
        self.copied = self.failed = 0
        self._queue: deque[control_pb2.CopyOrder] = deque()
        self._queued: set[str] = set()
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, orders) -> None:
        """Queue orders (never blocks); a key already queued is not queued twice."""
        with self._lock:
            for order in orders:
                if order.key not in self._queued and len(self._queue) < COPY_QUEUE and order.address:
                    self._queue.append(order)
                    self._queued.add(order.key)
            if self._thread is None and self._queue:
                self._thread = threading.Thread(target=self._run, name="kdn-drain-copier", daemon=True)
                self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for channel in self._channels.values():
            channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                batch = self._take()
            if not batch:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                rest = self._push(batch[0].address, batch)
                with self._lock:  # past the call's byte bound: first in line again
                    self._queue.extendleft(reversed(rest))
                    batch = [o for o in batch if o not in rest]
            except Exception as exc:  # noqa: BLE001 - the controller orders unfulfilled copies again
                self.failed += len(batch)
                log.warning("drain: pushing %d objects to %s failed: %s", len(batch), batch[0].address, exc)
            finally:
                with self._lock:
                    self._queued.difference_update(o.key for o in batch)

    def _take(self) -> list:
        """Orders to one address, up to about COPY_BATCH_BYTES by the sizes the index knows (or 256 keys)."""
        if not self._queue:
            return []
        address = self._queue[0].address
        batch, rest = [], deque()
        while self._queue and len(batch) < 256:
            order = self._queue.popleft()
            (batch if order.address == address else rest).append(order)
        self._queue.extendleft(reversed(rest))
        return batch

    def _push(self, address: str, orders: list) -> list:
        """One Replicate call to ``address``; returns the orders left for the next call (the byte bound)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = make_channel(address, self.tls)
        stub = data_pb2_grpc.DataStub(channel)

        attempted = 0

        def frames():
            nonlocal attempted
            sent = 0
            for order in orders:
                if self._stop.is_set() or sent >= COPY_BATCH_BYTES:
                    return
                attempted += 1
                found = self.node.store.get_many([order.key])[0]
                if found is None:
                    continue  # gone meanwhile: the controller sees that in the inventory
                view = memoryview(found[0])
                for offset in range(0, len(view), COPY_FRAME_BYTES):
                    yield data_pb2.PutFrame(key=order.key, total_size=len(view), offset=offset,
                                            data=bytes(view[offset:offset + COPY_FRAME_BYTES]),
                                            tier=order.tier if offset == 0 else "")
                sent += len(view)

        reply = stub.Replicate(frames(), timeout=COPY_TIMEOUT_S, metadata=self.metadata)
        stored = sum(1 for r in reply.results if r.stored)
        self.copied += stored
        self.failed += len(reply.results) - stored
        errors = {r.error for r in reply.results if not r.stored and r.error}
        log.info("drain: %d of %d objects copied to %s%s", stored, len(reply.results), address,
                 f" ({'; '.join(sorted(errors)[:3])})" if errors else "")
        return [] if self._stop.is_set() else orders[attempted:]
