"""The bulk channel's wire format: a framed TCP byte stream that moves chunk objects between clients and a storage
node. Its two ends are :mod:`kdn.wire.bulk_server` (a node's listener) and :mod:`kdn.wire.bulk_client`.

gRPC stays the control and fallback path; payload bytes move here, straight from the tier's buffer into the
socket (``sendmsg`` of memoryviews: frame headers and payloads in one call, never concatenated) and from the
socket into a preallocated buffer (``recv_into``). The wire format is in ``docs/protocol.md`` ("Bulk channel"):
a hello per connection (auth once per connection), then GET, PUT and RANGES requests (RANGES: byte ranges of
objects, e.g. one layer group's sections of every chunk, for layer-major delivery); little-endian, every length field
bounded, and every frame and payload padded to 64 bytes so that payloads stay 64-byte aligned in the stream
(the kernel's copies into and out of socket buffers run ~1.6x slower on misaligned data on the AMD hosts).

Errors raised by the client: ``Unavailable`` (refused, reset, closed, server busy or speaking another version:
fall back to gRPC), ``DeadlineExceeded`` (the call ran past ``timeout_s``), ``AuthError`` (bad token or tenant),
``InvalidRequest`` (a key that cannot be sent), or the error class the node's handler raised.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kdn.errors import AuthError, CapacityError, DeadlineExceeded, InvalidRequest, KDNError, NotFound, Unavailable
from kdn.wire.link import PACE_SLICE_BYTES, TokenBucket

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
