"""The bulk channel's client side: pooled connections to one node (wire format in :mod:`kdn.wire.bulk`)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kdn.errors import AuthError, DeadlineExceeded, InvalidRequest, Unavailable
from kdn.wire.buffers import Buffer, byte_view
from kdn.wire.bulk import (
    _ERROR_CODES,
    _GET_ITEM,
    _HELLO,
    _HELLO_REPLY,
    _KEY,
    _PUT_ITEM,
    _PUT_RESULT,
    _RANGE_ITEM,
    _REQ,
    _RESP,
    HELLO_AUTH,
    HELLO_BAD,
    HELLO_OK,
    ITEM_HIT,
    ITEM_MISS,
    MAGIC,
    MAX_KEY_BYTES,
    MAX_MESSAGE_BYTES,
    OP_GET,
    OP_PUT,
    OP_RANGES,
    PROTOCOL_VERSION,
    RESP_ERROR,
    RESP_OK,
    RESP_PROTOCOL,
    SOCK_BUF_BYTES,
    _block,
    _Conn,
    _pad,
    _payload_parts,
    _request,
    _split_address,
    _tune,
)


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
