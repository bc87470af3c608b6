"""The bulk channel: a framed TCP byte stream that moves chunk objects between clients and a storage node.

gRPC stays the control and fallback path; payload bytes move here, straight from the tier's buffer into the
socket (``sendmsg`` of memoryviews: frame headers and payloads in one call, never concatenated) and from the
socket into a preallocated buffer (``recv_into``). The wire format is in ``docs/protocol.md`` ("Bulk channel"):
a hello per connection (auth once per connection), then GET, PUT and RANGES requests (RANGES: byte ranges of
objects, e.g. one layer group's sections of every chunk, for layer-major delivery); little-endian, every length field
bounded, and every frame and payload padded to 64 bytes so that payloads stay 64-byte aligned in the stream
(the kernel's copies into and out of socket buffers run ~1.6x slower on misaligned data on the AMD hosts).

Errors raised by :class:`BulkClient`: ``Unavailable`` (refused, reset, closed, server busy or speaking another
version: fall back to gRPC), ``DeadlineExceeded`` (the call ran past ``timeout_s``), ``AuthError`` (bad token or
tenant), ``InvalidRequest`` (a key that cannot be sent), or the error class the node's handler raised.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from kdn.errors import AuthError, CapacityError, DeadlineExceeded, InvalidRequest, KDNError, NotFound, Unavailable
from kdn.wire.budget import InflightBudget, Reservation, receive_growing
from kdn.wire.buffers import Buffer, byte_view
from kdn.wire.link import PACE_SLICE_BYTES, TokenBucket
from kdn.wire.schedule import TransferScheduler

__all__ = ["BulkServer", "BulkClient", "BulkHandler", "MAGIC", "PROTOCOL_VERSION", "MAX_KEY_BYTES", "MAX_BATCH"]

log = logging.getLogger("kdn.wire.bulk")

MAGIC = b"KDNB"
PROTOCOL_VERSION = 1
ALIGN = 64
MAX_KEY_BYTES = 1024
MAX_BATCH = 4096
MAX_TOKEN_BYTES = 4096
MAX_TENANT_BYTES = 256
MAX_MESSAGE_BYTES = 4096
SOCK_BUF_BYTES = 0  # 0: kernel autotuning; measured faster on loopback than fixed 4 MiB buffers
_SMALL = 64 << 10  # payloads below this are read through the connection's buffer
_READ_BUF = 256 << 10
_IOV_BATCH = 512  # buffers per sendmsg call (IOV_MAX is 1024 on Linux)
SEND_QUANTUM = 4 << 20  # bytes a scheduled reply sends per slot grant
_ZEROS = bytes(ALIGN)

_HELLO = struct.Struct("<4sHHH")  # magic, version, token_len, tenant_len; then token, tenant (UTF-8)
_HELLO_REPLY = struct.Struct("<4sHBxQH")  # magic, version, status, max_object_bytes, message_len; then message
_REQ = struct.Struct("<BxxxI")  # op, count
_RESP = struct.Struct("<BBxxI")  # status, error code, count (or message length when status != OK)
_KEY = struct.Struct("<H")  # GET table entry: key_len; then key (ASCII)
_PUT_ITEM = struct.Struct("<HQ")  # PUT table entry: key_len, size; then key
_GET_ITEM = struct.Struct("<BQ")  # GET reply table entry: status (0 hit, 1 miss), size
_PUT_RESULT = struct.Struct("<BH")  # PUT reply table entry: stored, message_len; then message
_RANGE_ITEM = struct.Struct("<HQQ")  # RANGES table entry: key_len, offset, length; then key
_JOB = struct.Struct("<Q")  # after the request frame when op has OP_JOB: bytes the client's whole fetch still moves
OP_JOB = 0x80

OP_GET, OP_PUT, OP_RANGES = 1, 2, 3
HELLO_OK, HELLO_AUTH, HELLO_VERSION, HELLO_BUSY, HELLO_BAD, HELLO_ERROR = range(6)
RESP_OK, RESP_ERROR, RESP_PROTOCOL = range(3)
ITEM_HIT, ITEM_MISS = 0, 1
_ERROR_CODES: dict[int, type[KDNError]] = {0: Unavailable, 1: InvalidRequest, 2: AuthError, 3: CapacityError,
                                           4: NotFound, 5: DeadlineExceeded}


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


class _ProtocolError(Exception):
    """The peer broke the wire format; the connection is closed."""


def _pad(n: int) -> int:
    return -n % ALIGN


def _block(*chunks: bytes) -> bytes:
    """A small frame: the chunks concatenated and zero-padded to a multiple of ``ALIGN``."""
    data = b"".join(chunks)
    return data + _ZEROS[:_pad(len(data))]


def _message(text: str) -> bytes:
    return text.encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]


def _tune(sock: socket.socket, buf_bytes: int) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF) if buf_bytes > 0 else ():
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buf_bytes)
        except OSError:
            pass


class _Conn:
    """A socket with a read buffer for frame fields; large payloads are received straight into their buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._view = memoryview(bytearray(_READ_BUF))
        self._start = self._end = 0
        self.deadline: float | None = None
        self._armed = -1.0
        self.in_sync = True
        self.max_object_bytes = 0
        self.pacer: TokenBucket | None = None

    def arm(self) -> None:
        """Keep the socket timeout within the call's deadline (re-armed rarely: settimeout is a syscall)."""
        if self.deadline is None:
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        if self._armed < 0 or self._armed > remaining * 1.25 + 0.005:
            self.sock.settimeout(remaining)
            self._armed = remaining

    def _recv_into(self, view: memoryview) -> int:
        self.arm()
        got = self.sock.recv_into(view)
        if not got:
            raise ConnectionError("peer closed the connection")
        return got

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def read(self, n: int) -> bytes:
        if n > _READ_BUF:
            raise _ProtocolError(f"field of {n} bytes too long")
        while self._end - self._start < n:
            if self._start:
                left = self._end - self._start
                self._view[:left] = self._view[self._start:self._end]
                self._start, self._end = 0, left
            self._end += self._recv_into(self._view[self._end:])
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        return out

    def read_into(self, view: memoryview) -> None:
        """Fill ``view``, then consume the padding that follows a payload."""
        n = len(view)
        if n <= _SMALL:
            view[:] = self.read(n)
        else:
            pos = min(n, self._end - self._start)
            view[:pos] = self._view[self._start:self._start + pos]
            self._start += pos
            while pos < n:
                pos += self._recv_into(view[pos:])
        self.read(_pad(n))

    def fill(self, view: memoryview) -> None:
        """Fill ``view`` with the next bytes of the stream (no padding consumed)."""
        n = len(view)
        if n <= _SMALL:
            view[:] = self.read(n)
            return
        pos = min(n, self._end - self._start)
        view[:pos] = self._view[self._start:self._start + pos]
        self._start += pos
        while pos < n:
            pos += self._recv_into(view[pos:])

    def skip(self, n: int) -> None:
        """Read and discard ``n`` bytes (bounded memory: through the read buffer)."""
        while n > 0:
            step = min(n, _SMALL)
            self.read(step)
            n -= step

    def send(self, parts: list[Any]) -> None:
        """Send buffers in order with ``sendmsg`` (no concatenation; one wakeup of the peer per batch)."""
        parts = [p for p in parts if len(p)]
        if self.pacer is not None:  # an emulated link: slice by slice, each paid for before it is sent
            for part in parts:
                view = memoryview(part).cast("B")
                for off in range(0, len(view), PACE_SLICE_BYTES):
                    piece = view[off:off + PACE_SLICE_BYTES]
                    self.pacer.take(len(piece))
                    self.arm()
                    self.sock.sendall(piece)
            return
        if isinstance(self.sock, ssl.SSLSocket):  # TLS has no sendmsg: one record stream, buffer by buffer
            for part in parts:
                self.arm()
                self.sock.sendall(part)
            return
        i = 0
        while i < len(parts):
            self.arm()
            sent = self.sock.sendmsg(parts[i:i + _IOV_BATCH])
            while sent:
                n = len(parts[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    parts[i] = memoryview(parts[i])[sent:]
                    sent = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _quanta(parts: list[Any], quantum: int) -> Iterator[list[Any]]:
    """``parts`` regrouped into lists of about ``quantum`` bytes (views are split, never copied)."""
    batch: list[Any] = []
    size = 0
    for part in parts:
        view = memoryview(part).cast("B") if not isinstance(part, bytes) else memoryview(part)
        while len(view):
            take = view[:quantum - size]
            batch.append(take)
            size += len(take)
            view = view[len(take):]
            if size >= quantum:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _payload_parts(views: Sequence[memoryview | None]) -> list[Any]:
    parts: list[Any] = []
    for view in views:
        if view is not None:
            parts += [view, _ZEROS[:_pad(len(view))]]
    return parts


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


def _request(op: int, count: int, job_bytes: int) -> list[bytes]:
    """A request frame's fixed part: with a job hint, the OP_JOB bit and the u64 after it."""
    if job_bytes > 0:
        return [_REQ.pack(op | OP_JOB, count), _JOB.pack(min(job_bytes, 2**64 - 1))]
    return [_REQ.pack(op, count)]


def _error_code(exc: BaseException) -> int:
    return next((code for code, cls in _ERROR_CODES.items() if code and isinstance(exc, cls)), 0)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidRequest(f"bulk address must be host:port, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class BulkClient:
    """A thread-safe client with a pool of up to ``pool_size`` persistent connections (reconnects on failure).

    ``timeout_s`` is the deadline of each call, connecting included. GET and PUT are idempotent (objects are
    immutable), so a call that fails on a pooled connection is retried once on a fresh one.
    """

    def __init__(self, address: str, *, token: str = "", tenant: str = "", timeout_s: float = 10.0,
                 pool_size: int = 4, sock_buf_bytes: int = SOCK_BUF_BYTES,
                 ssl_context: ssl.SSLContext | None = None, server_name: str = "") -> None:
        self.address = address
        self._host, self._port = _split_address(address)
        self._ssl, self._server_name = ssl_context, server_name or self._host
        token_b, tenant_b = token.encode(), tenant.encode()
        self._hello = _block(_HELLO.pack(MAGIC, PROTOCOL_VERSION, len(token_b), len(tenant_b)), token_b, tenant_b)
        self.timeout_s = timeout_s
        self.sock_buf_bytes = sock_buf_bytes
        self._slots = threading.BoundedSemaphore(max(1, pool_size))
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        self._closed = False

    def get_many(self, keys: Sequence[str], *, alloc: Callable[[int], Buffer] | None = None,
                 job_bytes: int = 0) -> list[bytearray | None]:
        """Objects per key, ``None`` for a miss. ``alloc(size)`` may supply each destination buffer (exactly
        ``size`` writable bytes, e.g. from a pinned pool); by default each object gets a new bytearray.
        ``job_bytes``: what the caller's whole fetch still moves (the node sends fetches with less left first)."""
        if not keys:
            return []
        encoded = [self._encode_key(key) for key in keys]
        req = _block(*_request(OP_GET, len(keys), job_bytes), *(_KEY.pack(len(k)) + k for k in encoded))
        return self._call(lambda conn: self._get_on(conn, req, len(keys), alloc))

    def get_ranges(self, ranges: Sequence[tuple[str, int, int]], into: Sequence[memoryview], *,
                   job_bytes: int = 0) -> list[int]:
        """Byte ranges ``(key, offset, length)`` of objects, each received straight into ``into[i]`` (writable,
        at least ``length`` bytes); per range the bytes received (fewer at the object's end), or -1 for a miss.
        ``job_bytes`` as for :meth:`get_many`."""
        if len(into) != len(ranges):
            raise InvalidRequest(f"{len(into)} buffers for {len(ranges)} ranges")
        if not ranges:
            return []
        for view, (_, _, length) in zip(into, ranges):
            if view.readonly or view.nbytes < length:
                raise InvalidRequest(f"a range of {length} bytes needs as many writable bytes, got {view.nbytes}")
        table = []
        for key, offset, length in ranges:
            raw = self._encode_key(key)
            if offset < 0 or length < 0:
                raise InvalidRequest(f"bad range ({offset}, {length}) of {key}")
            table.append(_RANGE_ITEM.pack(len(raw), offset, length) + raw)
        req = _block(*_request(OP_RANGES, len(ranges), job_bytes), *table)
        return self._call(lambda conn: self._ranges_on(conn, req, into, [length for _, _, length in ranges]))

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[tuple[bool, str]]:
        """Store objects; per item (stored, error message). Objects over the node's limit are refused unsent."""
        if not items:
            return []
        encoded = [(self._encode_key(key), byte_view(data)) for key, data in items]
        return self._call(lambda conn: self._put_on(conn, encoded))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> BulkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _encode_key(key: str) -> bytes:
        try:
            raw = key.encode("ascii")
        except (UnicodeEncodeError, AttributeError):
            raise InvalidRequest(f"bulk keys must be ASCII strings, got {key!r}") from None
        if not 0 < len(raw) <= MAX_KEY_BYTES:
            raise InvalidRequest(f"key length {len(raw)} outside [1, {MAX_KEY_BYTES}]")
        return raw

    def _call(self, fn: Callable[[_Conn], Any]) -> Any:
        if self._closed:
            raise Unavailable("bulk client is closed")
        deadline = time.monotonic() + self.timeout_s
        if not self._slots.acquire(timeout=self.timeout_s):
            raise DeadlineExceeded(f"no free bulk connection to {self.address} within {self.timeout_s}s")
        try:
            for attempt in range(2):
                conn, reused = self._checkout(deadline, fresh=attempt > 0)
                conn.deadline, conn.in_sync = deadline, False
                try:
                    result = fn(conn)
                except OSError as exc:  # ConnectionError, TimeoutError included
                    conn.close()
                    if isinstance(exc, TimeoutError):
                        raise DeadlineExceeded(f"bulk call to {self.address} timed out") from exc
                    if reused and attempt == 0:
                        continue  # a stale pooled connection: retry once on a fresh one
                    raise Unavailable(f"bulk channel to {self.address} failed: {exc}") from exc
                except BaseException:
                    self._checkin(conn) if conn.in_sync else conn.close()
                    raise
                self._checkin(conn)
                return result
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    def _checkout(self, deadline: float, fresh: bool) -> tuple[_Conn, bool]:
        with self._lock:
            if fresh:  # one pooled connection was stale: the others likely are too (e.g. the node restarted)
                stale, self._idle = self._idle, []
            elif self._idle:
                return self._idle.pop(), True
            else:
                stale = []
        for conn in stale:
            conn.close()
        return self._connect(deadline), False

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, deadline: float) -> _Conn:
        sock = None
        try:
            error: OSError = OSError(f"cannot resolve {self._host}")
            for family, kind, proto, _, addr in socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM):
                sock = socket.socket(family, kind, proto)
                _tune(sock, self.sock_buf_bytes)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    sock.connect(addr)
                    break
                except OSError as exc:
                    sock.close()
                    sock, error = None, exc
            if sock is None:
                raise error
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self._server_name)
            conn = _Conn(sock)
            conn.deadline = deadline
            conn.send([self._hello])
            magic, _version, status, max_object, msg_len = _HELLO_REPLY.unpack(conn.read(_HELLO_REPLY.size))
            text = conn.read(min(msg_len, MAX_MESSAGE_BYTES)).decode("utf-8", "replace")
            if magic == MAGIC and status == HELLO_OK:
                conn.read(_pad(_HELLO_REPLY.size + msg_len))
        except OSError as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"connecting to bulk channel {self.address} timed out") from exc
            raise Unavailable(f"bulk channel {self.address} unreachable: {exc}") from exc
        if magic != MAGIC or status != HELLO_OK:
            conn.close()
            if magic == MAGIC and status == HELLO_AUTH:
                raise AuthError(text or "authentication failed")
            if magic == MAGIC and status == HELLO_BAD:
                raise InvalidRequest(f"bulk hello refused: {text}")
            raise Unavailable(f"bulk channel {self.address} refused the connection: {text or 'not a KDN node'}")
        conn.max_object_bytes = max_object
        return conn

    @staticmethod
    def _response(conn: _Conn, expected: int) -> None:
        status, code, count = _RESP.unpack(conn.read(_RESP.size))
        if status == RESP_OK and count == expected:
            return
        text = conn.read(min(count, MAX_MESSAGE_BYTES)).decode("utf-8", "replace") if status != RESP_OK else ""
        if status == RESP_ERROR and count <= MAX_MESSAGE_BYTES:
            conn.read(_pad(_RESP.size + count))
            conn.in_sync = True
            raise _ERROR_CODES.get(code, Unavailable)(text)
        conn.close()
        if status == RESP_PROTOCOL:
            raise InvalidRequest(f"bulk server rejected the request: {text}")
        raise Unavailable(f"bulk server sent a malformed response (status {status}, count {count})")

    def _get_on(self, conn: _Conn, req: bytes, n: int, alloc: Callable[[int], Buffer] | None) -> list[Any]:
        conn.send([req])
        self._response(conn, n)
        table = list(_GET_ITEM.iter_unpack(conn.read(n * _GET_ITEM.size)))
        conn.read(_pad(_RESP.size + n * _GET_ITEM.size))
        if any(status not in (ITEM_HIT, ITEM_MISS) or size > conn.max_object_bytes for status, size in table):
            conn.close()
            raise Unavailable("bulk server sent a malformed item table")
        out: list[Any] = []
        for status, size in table:
            if status == ITEM_MISS:
                out.append(None)
                continue
            buf = alloc(size) if alloc is not None else bytearray(size)
            view = byte_view(buf)
            if view.nbytes != size or view.readonly:
                raise InvalidRequest(f"alloc({size}) returned {view.nbytes} {'read-only ' * view.readonly}bytes")
            conn.read_into(view)
            out.append(buf)
        conn.in_sync = True
        return out

    def _ranges_on(self, conn: _Conn, req: bytes, into: Sequence[memoryview], lengths: list[int]) -> list[int]:
        n = len(into)
        conn.send([req])
        self._response(conn, n)
        table = list(_GET_ITEM.iter_unpack(conn.read(n * _GET_ITEM.size)))
        conn.read(_pad(_RESP.size + n * _GET_ITEM.size))
        if any(status not in (ITEM_HIT, ITEM_MISS) or size > length for (status, size), length in zip(table, lengths)):
            conn.close()
            raise Unavailable("bulk server sent a malformed range table")
        out = []
        for (status, size), view in zip(table, into):
            if status == ITEM_MISS:
                out.append(-1)
                continue
            conn.read_into(view[:size])
            out.append(size)
        conn.in_sync = True
        return out

    def _put_on(self, conn: _Conn, items: list[tuple[bytes, memoryview]]) -> list[tuple[bool, str]]:
        limit = conn.max_object_bytes
        sent = [(key, view) for key, view in items if view.nbytes <= limit]
        head = _block(_REQ.pack(OP_PUT, len(sent)), *(_PUT_ITEM.pack(len(k), v.nbytes) + k for k, v in sent))
        conn.send([head, *_payload_parts([v for _, v in sent])])
        self._response(conn, len(sent))
        got, table = [], _RESP.size
        for _ in sent:
            stored, msg_len = _PUT_RESULT.unpack(conn.read(_PUT_RESULT.size))
            got.append((stored == 1, conn.read(msg_len).decode("utf-8", "replace")))
            table += _PUT_RESULT.size + msg_len
        conn.read(_pad(table))
        conn.in_sync = True
        results = iter(got)
        return [next(results) if view.nbytes <= limit
                else (False, f"object of {view.nbytes} bytes over the node's limit of {limit}") for _, view in items]
