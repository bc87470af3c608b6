"""A client of one storage node's data plane: shared memory for a node on this host, then the bulk byte channel
when the node has one, gRPC otherwise.

Gets try the node's shared arena first (:mod:`kdn.wire.shm`; zero-copy, same host and user only); keys it does not hold
there go over the bulk channel. If the shared-memory channel cannot be used it is not tried again for
``SHM_RETRY_S`` seconds. The bulk channel carries payload bytes; if it fails (refused, reset), the call is retried
once over gRPC and the bulk channel is not used again for ``BULK_RETRY_S`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from kdn.errors import AuthError, InvalidRequest, Unavailable
from kdn.v1 import data_pb2, data_pb2_grpc
from kdn.wire.auth import call_metadata
from kdn.wire.buffers import Buffer
from kdn.wire.rpc import DEFAULT_FRAME_BYTES, make_channel, raise_from_rpc, ssl_context

if TYPE_CHECKING:
    from kdn.config import TLSConfig

__all__ = ["NodeClient"]

log = logging.getLogger(__name__)

BULK_RETRY_S = 5.0
SHM_RETRY_S = 30.0
MAX_REPORT_KEYS = 4096  # keys per ReportBad call (the node's limit)


class NodeClient:
    """Thread-safe client of one node. ``transport``: ``bulk`` (shared memory on the same host when
    ``shared_memory``, else the bulk channel, with gRPC fallback) or ``grpc`` (gRPC only)."""

    def __init__(self, address: str, bulk_address: str = "", *, tenant: str = "default", token: str = "",
                 timeout_s: float = 10.0, transport: str = "bulk", tls: TLSConfig | None = None,
                 shared_memory: bool = True, bulk_streams: int = 4) -> None:
        if transport not in ("bulk", "grpc"):
            raise InvalidRequest(f"transport must be 'bulk' or 'grpc', got {transport!r}")
        self.address = address
        self.bulk_address = bulk_address if transport == "bulk" else ""
        self._bulk_ssl = ssl_context(tls, server=False) if self.bulk_address else None
        self._server_name = tls.server_name if tls else ""
        self.tenant = tenant
        self.token = token
        self.timeout_s = timeout_s
        self.metadata = call_metadata(token, tenant)
        self._channel = make_channel(address, tls)
        self._stub = data_pb2_grpc.DataStub(self._channel)
        self._bulk = None
        self._bulk_streams = max(1, bulk_streams)
        self._bulk_down_until = 0.0
        self._shm = None
        self._shm_worked = False
        # ``grpc`` means every byte over gRPC (no bulk channel, no shared memory).
        self._shm_down_until = 0.0 if shared_memory and transport == "bulk" else float("inf")
        self._lock = threading.Lock()
        self._bad: dict[str, None] = {}  # keys to report as bad (ordered set)
        self._reporter: threading.Thread | None = None

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        if self._bulk is not None:
            self._bulk.close()
        self._channel.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bulk channel -------------------------------------------------------------------------------------------
    def _bulk_client(self):
        if not self.bulk_address or time.monotonic() < self._bulk_down_until:
            return None
        with self._lock:
            if self._bulk is None:
                from kdn.wire.bulk_client import BulkClient

                self._bulk = BulkClient(self.bulk_address, token=self.token, tenant=self.tenant,
                                        timeout_s=self.timeout_s, ssl_context=self._bulk_ssl,
                                        server_name=self._server_name, pool_size=self._bulk_streams)
            return self._bulk

    def _bulk_failed(self, exc: Exception) -> None:
        log.warning("bulk channel %s failed (%s); using gRPC for %.0f s", self.bulk_address, exc, BULK_RETRY_S)
        self._bulk_down_until = time.monotonic() + BULK_RETRY_S

    # -- shared memory ------------------------------------------------------------------------------------------
    def _get_shared(self, keys: Sequence[str]) -> list[Buffer | None]:
        """Objects read in place from the node's shared arena; ``None`` for keys it cannot give that way."""
        if time.monotonic() < self._shm_down_until:
            return [None] * len(keys)
        with self._lock:
            if self._shm is None:
                from kdn.wire.shm import ShmClient

                self._shm = ShmClient(self.address, token=self.token, tenant=self.tenant, timeout_s=self.timeout_s)
            shm = self._shm
        try:
            out = shm.get_many(keys)
            self._shm_worked = True
            return out
        except AuthError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of this path means: use the network path
            log.log(logging.WARNING if self._shm_worked else logging.DEBUG,
                    "shared memory of %s unavailable (%s); using the network for %.0f s", self.address, exc,
                    SHM_RETRY_S)
            self._shm_down_until = time.monotonic() + SHM_RETRY_S
            return [None] * len(keys)

    # -- operations ---------------------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str], *, alloc: Callable[[int], Buffer] | None = None,
                 job_bytes: int = 0) -> list[Buffer | None]:
        """Whole objects for ``keys`` (``None`` for misses). ``alloc(size)`` may supply the buffers that objects
        arriving over the bulk channel are received into (e.g. a :class:`~kdn.wire.recv_pool.ReceivePool`'s);
        ``job_bytes``: what the caller's whole fetch still moves (the node's send order). Raises
        Unavailable/DeadlineExceeded/AuthError."""
        out = self._get_shared(keys)
        missing = [i for i, data in enumerate(out) if data is None]
        if len(missing) < len(keys):
            if missing:
                for i, data in zip(missing, self._get_remote([keys[i] for i in missing], alloc, job_bytes)):
                    out[i] = data
            return out
        return self._get_remote(keys, alloc, job_bytes)

    def _get_remote(self, keys: Sequence[str], alloc: Callable[[int], Buffer] | None = None,
                    job_bytes: int = 0) -> list[Buffer | None]:
        bulk = self._bulk_client()
        if bulk is not None:
            try:
                return bulk.get_many(list(keys), alloc=alloc, job_bytes=job_bytes)
            except AuthError:
                raise
            except Unavailable as exc:
                self._bulk_failed(exc)
        out: list[Buffer | None] = [None] * len(keys)
        bufs: dict[int, bytearray] = {}
        try:
            for frame in self.get_frames(keys):
                if not frame.found:
                    continue
                buf = bufs.get(frame.index)
                if buf is None:
                    buf = bufs[frame.index] = bytearray(frame.total_size)
                end = frame.offset + len(frame.data)
                if end > len(buf):
                    raise Unavailable("node sent a frame past the end of its object")
                buf[frame.offset:end] = frame.data
                if end == len(buf):
                    out[frame.index] = buf
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"get from {self.address}")
        return out

    def get_ranges(self, ranges: Sequence[tuple[str, int, int]], into: Sequence[memoryview], *,
                   job_bytes: int = 0) -> list[int]:
        """Byte ranges of objects over the bulk channel, received into ``into`` (see
        :meth:`kdn.wire.bulk_client.BulkClient.get_ranges`). Raises Unavailable when the node has no working bulk
        channel (the caller reads whole objects instead), DeadlineExceeded, AuthError."""
        bulk = self._bulk_client()
        if bulk is None:
            raise Unavailable(f"node {self.address} has no bulk channel for range reads")
        try:
            return bulk.get_ranges(ranges, into, job_bytes=job_bytes)
        except Unavailable as exc:
            self._bulk_failed(exc)
            raise

    def prefers_whole_objects(self, key: str) -> bool:
        """Whether whole-object reads beat layer-major range reads here: the node has no working bulk channel, or
        its shared arena serves ``key`` in place (tried now unless that path is known down)."""
        if not self.bulk_address or time.monotonic() < self._bulk_down_until:
            return True
        if time.monotonic() < self._shm_down_until:
            return False
        return self._get_shared([key])[0] is not None

    def get_frames(self, keys: Sequence[str], max_frame_bytes: int = DEFAULT_FRAME_BYTES) -> Iterator:
        """The raw gRPC frame stream (header frame, then one frame per section) for layer-wise consumers."""
        return self._stub.Get(data_pb2.GetRequest(keys=list(keys), max_frame_bytes=max_frame_bytes),
                              timeout=self.timeout_s, metadata=self.metadata)

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        return [ok for ok, _ in self.put_many_detailed(items)]

    def put_many_detailed(self, items: Sequence[tuple[str, Buffer]], tier: str = "") -> list[tuple[bool, str]]:
        """Store objects; per item ``(stored, error)``. ``tier`` is a placement hint (sent over gRPC only)."""
        if not items:
            return []
        bulk = None if tier else self._bulk_client()
        if bulk is not None:
            try:
                return bulk.put_many(list(items))
            except AuthError:
                raise
            except Unavailable as exc:
                self._bulk_failed(exc)

        def frames():
            for key, data in items:
                view = memoryview(data)
                for off in range(0, max(len(view), 1), DEFAULT_FRAME_BYTES):
                    yield data_pb2.PutFrame(key=key, total_size=len(view), offset=off, tier=tier if off == 0 else "",
                                            data=bytes(view[off:off + DEFAULT_FRAME_BYTES]))

        try:
            reply = self._stub.Put(frames(), timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"put to {self.address}")
        if len(reply.results) != len(items):
            raise Unavailable(f"node {self.address} answered {len(reply.results)} results for {len(items)} objects")
        return [(r.stored, r.error) for r in reply.results]

    def contains_many(self, keys: Sequence[str]) -> list[str]:
        """The tier holding each key, '' when absent."""
        try:
            reply = self._stub.Contains(data_pb2.KeysRequest(keys=list(keys)), timeout=self.timeout_s,
                                        metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"contains on {self.address}")
        return list(reply.tier)

    def move_many(self, keys: Sequence[str], tier: str) -> list[bool]:
        """Ask the node to make ``tier`` the fastest tier holding each key."""
        try:
            reply = self._stub.Move(data_pb2.MoveRequest(keys=list(keys), tier=tier), timeout=self.timeout_s,
                                    metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"move on {self.address}")
        return list(reply.moved)

    def report_bad(self, keys: Sequence[str]) -> None:
        """Tell the node that copies of ``keys`` it sent did not verify, so that it drops the bad ones (and the
        controller stops listing them). In a background thread, best effort: never blocks, never raises."""
        with self._lock:
            self._bad.update(dict.fromkeys(keys))
            if self._reporter is not None:
                return
            self._reporter = threading.Thread(target=self._send_reports, name="kdn-report-bad", daemon=True)
            reporter = self._reporter
        reporter.start()

    def _send_reports(self) -> None:
        while True:
            with self._lock:
                keys = list(self._bad)[:MAX_REPORT_KEYS]
                for key in keys:
                    del self._bad[key]
                if not keys:
                    self._reporter = None
                    return
            try:
                reply = self._stub.ReportBad(data_pb2.KeysRequest(keys=keys), timeout=self.timeout_s,
                                             metadata=self.metadata)
                log.info("reported %d bad copies to %s: %d dropped", len(keys), self.address, sum(reply.dropped))
            except Exception as exc:  # noqa: BLE001 - best effort: the copy was refused here either way
                log.warning("reporting %d bad copies to %s failed: %s", len(keys), self.address, exc)

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        try:
            reply = self._stub.Delete(data_pb2.KeysRequest(keys=list(keys)), timeout=self.timeout_s,
                                      metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"delete on {self.address}")
        return list(reply.deleted)

    def stats(self) -> data_pb2.NodeStats:
        try:
            return self._stub.Stats(data_pb2.NodeStatsRequest(), timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"stats of {self.address}")
