"""The bulk channel's server side: a storage node's listener, one thread per connection (wire format in
:mod:`kdn.wire.bulk`)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from kdn.errors import AuthError, CapacityError, InvalidRequest, KDNError
from kdn.wire.budget import InflightBudget, Reservation, receive_growing
from kdn.wire.buffers import Buffer, byte_view
from kdn.wire.bulk import (
    _GET_ITEM,
    _HELLO,
    _HELLO_REPLY,
    _JOB,
    _KEY,
    _PUT_ITEM,
    _PUT_RESULT,
    _RANGE_ITEM,
    _REQ,
    _RESP,
    HELLO_AUTH,
    HELLO_BAD,
    HELLO_BUSY,
    HELLO_ERROR,
    HELLO_OK,
    HELLO_VERSION,
    ITEM_HIT,
    ITEM_MISS,
    MAGIC,
    MAX_BATCH,
    MAX_KEY_BYTES,
    MAX_TENANT_BYTES,
    MAX_TOKEN_BYTES,
    OP_GET,
    OP_JOB,
    OP_PUT,
    OP_RANGES,
    PROTOCOL_VERSION,
    RESP_ERROR,
    RESP_OK,
    RESP_PROTOCOL,
    SEND_QUANTUM,
    SOCK_BUF_BYTES,
    _block,
    _Conn,
    _error_code,
    _message,
    _pad,
    _payload_parts,
    _ProtocolError,
    _quanta,
    _tune,
)
from kdn.wire.link import TokenBucket
from kdn.wire.schedule import TransferScheduler

log = logging.getLogger("kdn.wire.bulk")


class BulkHandler(Protocol):
    """What a node implements to serve the bulk channel. Called from connection threads concurrently."""

    def authenticate(self, token: str, tenant: str) -> Any:
        """Return the principal for this connection, or raise ``AuthError``."""

    def get_many(self, principal: Any, keys: list[str]) -> list[Buffer | None]:
        """Objects per key (``None`` = miss); buffers must stay unchanged while they are being sent. A handler
        may also define ``get_leased(principal, keys) -> (buffers, release)``: then the server sends the buffers
        (e.g. views of the tier's memory, no copy) and calls ``release()`` once they are on the wire."""

    def put_many(self, principal: Any, items: list[tuple[str, Buffer]]) -> list[tuple[bool, str]]:
        """Store objects (fresh bytearrays the handler may keep); per item (stored, error message)."""


class BulkServer:
    """Serves a :class:`BulkHandler` over TCP: a thread per (long-lived, pooled) connection, at most
    ``max_connections`` at once. ``start()`` binds (port 0 picks a free one) and returns the port."""

    def __init__(self, host: str, port: int, handler: BulkHandler, *, max_object_bytes: int,
                 max_connections: int = 256, io_timeout_s: float = 30.0, idle_timeout_s: float = 600.0,
                 max_batch_bytes: int = 256 << 20, sock_buf_bytes: int = SOCK_BUF_BYTES,
                 ssl_context: ssl.SSLContext | None = None, link_gbps: float = 0.0,
                 inflight: InflightBudget | None = None, send_scheduler: TransferScheduler | None = None) -> None:
        self.host, self.port, self.handler = host, port, handler
        # Replies wait for one of its slots, shortest remaining first (None: every connection sends at once).
        self.send_scheduler = send_scheduler
        # Put bytes received and not yet stored, per tenant and in total (None: bounded per connection only).
        self.inflight = inflight
        self.link = TokenBucket(link_gbps) if link_gbps > 0 else None
        self.ssl_context = ssl_context
        self.max_object_bytes = int(max_object_bytes)
        self.max_connections = max_connections
        self.io_timeout_s, self.idle_timeout_s = io_timeout_s, idle_timeout_s
        self.max_batch_bytes = max_batch_bytes
        self.sock_buf_bytes = sock_buf_bytes
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._busy: set[socket.socket] = set()
        self._stopping = False

    def start(self) -> int:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(listener, self.sock_buf_bytes)  # accepted sockets inherit buffer sizes (window scaling)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"kdn-bulk-accept-{self.port}",
                                               daemon=True)
        self._accept_thread.start()
        return self.port

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace_s``, then close every connection."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            idle = [s for s in self._conns if s not in self._busy]
        if self._listener is not None:
            self._shutdown(self._listener)  # wakes the accept() in progress
            self._listener.close()
        for sock in idle:
            self._shutdown(sock)
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            with self._lock:
                if not self._busy:
                    break
            time.sleep(0.01)
        with self._lock:
            conns = dict(self._conns)
        for sock in conns:
            self._shutdown(sock)
        for thread in [*conns.values(), self._accept_thread]:
            if thread is not None:
                thread.join(timeout=1.0)

    def __enter__(self) -> BulkServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            _tune(sock, 0)
            with self._lock:
                full = len(self._conns) >= self.max_connections or self._stopping
                if not full:
                    thread = threading.Thread(target=self._serve, args=(sock,), name="kdn-bulk-conn", daemon=True)
                    self._conns[sock] = thread
            if not full:
                thread.start()
                continue
            try:
                sock.settimeout(1.0)
                sock.sendall(_block(_HELLO_REPLY.pack(MAGIC, PROTOCOL_VERSION, HELLO_BUSY, 0, 0)))
            except OSError:
                pass
            sock.close()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        conn.pacer = self.link
        try:
            sock.settimeout(self.io_timeout_s)  # per receive and per sendmsg; idle waits are counted below
            if self.ssl_context is not None:  # handshake in this connection's thread, never in the accept loop
                conn.sock = self.ssl_context.wrap_socket(sock, server_side=True)
            principal = self._hello(conn)
            while principal is not None and not self._stopping:
                op, count = _REQ.unpack(self._next_request(conn))
                with self._lock:
                    self._busy.add(sock)
                if count > MAX_BATCH:
                    raise _ProtocolError(f"batch of {count} items over the limit of {MAX_BATCH}")
                if op == OP_PUT | OP_JOB:
                    raise _ProtocolError("a PUT carries no job hint")
                job = _JOB.unpack(conn.read(_JOB.size))[0] if op & OP_JOB else 0
                op &= ~OP_JOB
                if op == OP_GET:
                    self._get(conn, principal, count, job)
                elif op == OP_RANGES:
                    self._ranges(conn, principal, count, job)
                elif op == OP_PUT:
                    self._put(conn, principal, count)
                else:
                    raise _ProtocolError(f"unknown op {op}")
                with self._lock:
                    self._busy.discard(sock)
        except _ProtocolError as exc:
            log.warning("bulk: closing connection: %s", exc)
            try:
                msg = _message(str(exc))
                sock.sendall(_block(_RESP.pack(RESP_PROTOCOL, 1, len(msg)), msg))
            except OSError:
                pass
        except OSError:
            pass  # peer gone, timed out, or the server is stopping
        except Exception:
            log.exception("bulk: connection failed")
        finally:
            with self._lock:
                self._conns.pop(sock, None)
                self._busy.discard(sock)
            conn.close()

    def _next_request(self, conn: _Conn) -> bytes:
        idle_since = time.monotonic()
        while True:
            try:
                return conn.read(_REQ.size)
            except TimeoutError:
                if conn.buffered or time.monotonic() - idle_since > self.idle_timeout_s:
                    raise

    def _hello(self, conn: _Conn) -> Any:
        magic, version, token_len, tenant_len = _HELLO.unpack(conn.read(_HELLO.size))
        status, text, principal = HELLO_OK, "", None
        if magic != MAGIC:
            status, text = HELLO_BAD, "not a KDN bulk client"
        elif version != PROTOCOL_VERSION:
            status, text = HELLO_VERSION, f"bulk protocol version {version} not supported (server: {PROTOCOL_VERSION})"
        elif token_len > MAX_TOKEN_BYTES or tenant_len > MAX_TENANT_BYTES:
            status, text = HELLO_BAD, "token or tenant too long"
        else:
            try:
                token = conn.read(token_len).decode("utf-8")
                tenant = conn.read(tenant_len).decode("utf-8")
                conn.read(_pad(_HELLO.size + token_len + tenant_len))
                principal = self.handler.authenticate(token, tenant)
            except UnicodeDecodeError:
                status, text = HELLO_BAD, "token and tenant must be UTF-8"
            except AuthError as exc:
                status, text = HELLO_AUTH, str(exc) or "authentication failed"
            except KDNError as exc:  # e.g. InvalidRequest for a malformed tenant name
                status, text = (HELLO_BAD if isinstance(exc, InvalidRequest) else HELLO_ERROR), str(exc)
        msg = _message(text)
        conn.send([_block(_HELLO_REPLY.pack(MAGIC, PROTOCOL_VERSION, status, self.max_object_bytes, len(msg)), msg)])
        return principal if status == HELLO_OK else None

    def _read_key(self, conn: _Conn, key_len: int) -> str:
        if not 0 < key_len <= MAX_KEY_BYTES:
            raise _ProtocolError(f"key length {key_len} outside [1, {MAX_KEY_BYTES}]")
        try:
            return conn.read(key_len).decode("ascii")
        except UnicodeDecodeError:
            raise _ProtocolError("keys must be ASCII") from None

    def _get(self, conn: _Conn, principal: Any, count: int, job: int = 0) -> None:
        keys, table = [], _REQ.size + (_JOB.size if job else 0)
        for _ in range(count):
            (key_len,) = _KEY.unpack(conn.read(_KEY.size))
            keys.append(self._read_key(conn, key_len))
            table += _KEY.size + key_len
        conn.read(_pad(table))
        self._send_objects(conn, principal, keys, None, job)

    def _ranges(self, conn: _Conn, principal: Any, count: int, job: int = 0) -> None:
        """Byte ranges of objects: each the part of ``[offset, offset + length)`` the object holds (shorter at its
        end; a miss when it starts past the end or the object is absent)."""
        ranges, table = [], _REQ.size + (_JOB.size if job else 0)
        for _ in range(count):
            key_len, offset, length = _RANGE_ITEM.unpack(conn.read(_RANGE_ITEM.size))
            ranges.append((self._read_key(conn, key_len), offset, length))
            table += _RANGE_ITEM.size + key_len
            if length > self.max_object_bytes:
                raise _ProtocolError(f"range of {length} bytes over the object limit of {self.max_object_bytes}")
        conn.read(_pad(table))
        keys = list(dict.fromkeys(key for key, _, _ in ranges))
        self._send_objects(conn, principal, keys, ranges, job)

    def _send_objects(self, conn: _Conn, principal: Any, keys: list[str],
                      ranges: list[tuple[str, int, int]] | None, job: int = 0) -> None:
        """Reply with the objects of ``keys`` (``ranges`` is None) or with those byte ranges of them; ``job``: the
        bytes the client's whole fetch still moves (its priority on the send path; 0 = this reply's size)."""
        count = len(keys) if ranges is None else len(ranges)
        release: Callable[[], None] | None = None
        try:
            if keys and hasattr(self.handler, "get_leased"):
                bufs, release = self.handler.get_leased(principal, keys)
            else:
                bufs = self.handler.get_many(principal, keys) if keys else []
            if len(bufs) != len(keys):
                raise RuntimeError(f"handler returned {len(bufs)} objects for {len(keys)} keys")
        except Exception as exc:
            if release is not None:
                release()
            if not isinstance(exc, KDNError):
                log.exception("bulk: get handler failed")
            msg = _message(str(exc) or type(exc).__name__)
            conn.send([_block(_RESP.pack(RESP_ERROR, _error_code(exc), len(msg)), msg)])
            return
        try:
            views = [None if b is None else byte_view(b) for b in bufs]
            if ranges is not None:
                found = dict(zip(keys, views))
                views = [None if (v := found[key]) is None or offset >= v.nbytes else v[offset:offset + length]
                         for key, offset, length in ranges]
            head = _block(_RESP.pack(RESP_OK, 0, count), *(_GET_ITEM.pack(ITEM_MISS, 0) if v is None
                                                           else _GET_ITEM.pack(ITEM_HIT, len(v)) for v in views))
            self._send_reply(conn, [head, *_payload_parts(views)], job)
        finally:
            if release is not None:
                release()

    def _send_reply(self, conn: _Conn, parts: list[Any], job: int = 0) -> None:
        """Send a reply; with a send scheduler, ``SEND_QUANTUM`` bytes at a time, each when the scheduler gives this
        reply a slot: the reply of a fetch with fewer bytes left (``job``, the client's hint, at least the reply's
        size) overtakes longer ones at the next quantum, the node side of SRPT."""
        scheduler = self.send_scheduler
        if scheduler is None:
            conn.send(parts)
            return
        remaining = max(job, sum(len(p) for p in parts))
        ticket = scheduler.submit(object(), remaining)
        try:
            for batch in _quanta(parts, SEND_QUANTUM):
                if not scheduler.acquire(ticket, timeout=self.io_timeout_s):
                    raise TimeoutError("no send slot within the I/O timeout")
                try:
                    conn.send(batch)
                finally:
                    scheduler.release(ticket)
                remaining -= sum(len(p) for p in batch)
                scheduler.update(ticket, remaining)
        finally:
            scheduler.done(ticket)

    def _put(self, conn: _Conn, principal: Any, count: int) -> None:
        """Objects are received as their bytes arrive (:func:`~kdn.wire.budget.receive_growing`: the declared size
        never drives an allocation); what the connection holds is charged to the in-flight budget and handed to the
        tiers every ``max_batch_bytes``. An object the budget cannot take is read and discarded (bounded memory)
        and refused with the budget's message; the connection stays in sync."""
        entries, table = [], _REQ.size
        for _ in range(count):  # the whole table is checked before any payload is read
            key_len, size = _PUT_ITEM.unpack(conn.read(_PUT_ITEM.size))
            entries.append((self._read_key(conn, key_len), size))
            table += _PUT_ITEM.size + key_len
            if size > self.max_object_bytes:
                raise _ProtocolError(f"object of {size} bytes over the limit of {self.max_object_bytes}")
        conn.read(_pad(table))
        results: list[tuple[bool, str]] = []
        batch: list[tuple[str, Buffer]] = []
        refused: dict[int, str] = {}  # index in this request -> why
        batch_bytes = 0
        reservation = Reservation(self.inflight, str(getattr(principal, "tenant", "")))
        try:
            for index, (key, size) in enumerate(entries):
                got = 0

                def fill(view: memoryview) -> None:
                    nonlocal got
                    conn.fill(view)
                    got += len(view)

                try:
                    buf = receive_growing(size, fill, reservation)
                except CapacityError as exc:
                    reservation.release(reservation.held - batch_bytes)  # this object's partial buffer
                    conn.skip(size - got)
                    refused[index] = str(exc)
                else:
                    batch.append((key, buf))
                    batch_bytes += size
                conn.skip(_pad(size))
                if batch_bytes >= self.max_batch_bytes:  # bound memory per connection: store as we go
                    results += self._store(principal, batch)
                    batch, batch_bytes = [], 0
                    reservation.release()
            results += self._store(principal, batch)
        finally:
            reservation.release()
        if refused:  # merge the refusals back in request order
            stored = iter(results)
            results = [(False, refused[i]) if i in refused else next(stored) for i in range(count)]
        msgs = [(ok, _message(text)) for ok, text in results]
        conn.send([_block(_RESP.pack(RESP_OK, 0, count),
                          *(_PUT_RESULT.pack(int(ok), len(m)) + m for ok, m in msgs))])

    def _store(self, principal: Any, batch: list[tuple[str, Buffer]]) -> list[tuple[bool, str]]:
        if not batch:
            return []
        try:
            results = self.handler.put_many(principal, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"handler returned {len(results)} results for {len(batch)} objects")
            return [(bool(ok), str(text)) for ok, text in results]
        except Exception as exc:
            if not isinstance(exc, KDNError):
                log.exception("bulk: put handler failed")
            return [(False, str(exc) or type(exc).__name__)] * len(batch)
