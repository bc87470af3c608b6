"""Same-host shared-memory reads: clients map their tenant's memory-tier arena of a node and read objects in place.

A node whose ``memory`` tier is a :class:`~kdn.node.tiers.shared.SharedMemoryTier` (one memfd arena per tenant)
listens on an abstract unix socket named ``kdn-shm:<node gRPC address>`` (:func:`socket_name`). A client on the same
host (same network namespace, same boot id, same uid: checked on both sides with ``SO_PEERCRED``) connects and
authenticates with its token and tenant. Then, per fetch, it asks for *leases* on keys: the node pins each object
of the connection's own tenant (never evicted, overwritten or freed while leased; every other key is a miss, for
admin tokens too) and answers ``(lease id, offset, size)`` in that tenant's arena, attaching the arena's memfd
(``SCM_RIGHTS``) the first time a connection needs it; the client maps it read-only once per arena, reads the bytes
in place and releases the lease when the last reference to them is dropped. A connection never receives an arena
of another tenant, so no offset it can name or read reaches another tenant's bytes. Leases belong to the
connection: a client that dies releases them all; a client keeps a broken connection open until its outstanding
leases are gone. The node marks its process non-dumpable when it serves arenas, so that other processes of its
user cannot take every tenant's memfd from ``/proc/<pid>/fd`` (or ptrace it).

Wire format (little-endian; every message is ``u32 length`` + body, at most :data:`MAX_MESSAGE`) — see
``docs/protocol.md``: hello ``"KDNS" u16 version u16 token_len u16 tenant_len token tenant``; reply ``"KDNS" u16
version u8 status x 36s boot_id u16 msg_len msg``; LEASE ``u8 1, 3x, u32 count, count x (u16 len, key)`` (at most
:data:`MAX_LEASE_KEYS` keys of 1..:data:`MAX_KEY_BYTES` ASCII bytes) -> ``u32 count, u8 flags, 3x, 16s arena_id,
u64 arena_size, count x (u64 lease, u64 offset, u64 size)`` (lease 0: miss; flags bit 0: the arena's memfd is
attached); RELEASE ``u8 2, 3x, u32 count, count x u64 lease`` (at most :data:`MAX_RELEASE_IDS`; no reply). A
malformed or oversized request closes the connection before any work is done for it.

The client checks each object's header, key, layout fingerprint and codec as for every other read; section
checksums are not re-verified on this path (the node verified them at put time and the bytes never left this
host's memory; xxh3 of 1 GiB costs ~45 ms on one core, as long as the whole load): :func:`is_shared` tells
readers which buffers came this way. :mod:`kdn.client.same_host` copies ``raw`` objects straight from the mapping
(registered with CUDA once per mapping) to the GPU.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import socket
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdn.errors import AuthError, InvalidRequest, Unavailable

__all__ = ["ShmServer", "ShmClient", "SharedBytes", "is_shared", "socket_name", "boot_id", "MAX_LEASE_KEYS"]

log = logging.getLogger(__name__)

MAGIC = b"KDNS"
VERSION = 2
#: Keys of one LEASE request (a prefix of 128K tokens in 256-token chunks is 512); the client splits larger asks.
MAX_LEASE_KEYS = 4096
#: Bytes of one key (chunk keys are ~100 bytes).
MAX_KEY_BYTES = 512
#: Lease ids of one RELEASE message.
MAX_RELEASE_IDS = 1 << 16
#: Leases one connection may hold at once; further keys are misses until some are released.
MAX_LEASES_PER_CONN = 1 << 16
HANDSHAKE_TIMEOUT_S = 2.0
RELEASE_BATCH_S = 0.001
_LEN = struct.Struct("<I")
_HELLO = struct.Struct("<4sHHH")
_REPLY = struct.Struct("<4sHBx36sH")
_REQ = struct.Struct("<BxxxI")
_TABLE = struct.Struct("<IBxxx16sQ")
_KEY = struct.Struct("<H")
_ITEM = struct.Struct("<QQQ")
_ID = struct.Struct("<Q")
#: The largest message either side accepts (a LEASE of MAX_LEASE_KEYS keys of MAX_KEY_BYTES, a full RELEASE).
MAX_MESSAGE = max(_REQ.size + MAX_LEASE_KEYS * (_KEY.size + MAX_KEY_BYTES), _REQ.size + MAX_RELEASE_IDS * _ID.size,
                  _TABLE.size + MAX_LEASE_KEYS * _ITEM.size)
OP_LEASE, OP_RELEASE = 1, 2
OK, AUTH, REFUSED, BAD = range(4)
FLAG_FD = 1
_NO_ARENA = bytes(16)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PR_SET_DUMPABLE = 4


def socket_name(address: str) -> str:
    """The abstract unix socket name of the node whose gRPC address (as clients know it) is ``address``."""
    return f"kdn-shm:{address}"


def boot_id() -> str:
    """This host's boot id (36 characters; empty where unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:36]
    except OSError:
        return ""


def protect_process() -> bool:
    """Mark this process non-dumpable: other processes of its user can then neither ptrace it nor open its file
    descriptors through ``/proc/<pid>/fd`` (root can). False where the call failed (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _peer_uid(sock: socket.socket) -> int:
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1]


def _send(sock: socket.socket, body: bytes, fds: Sequence[int] = ()) -> None:
    data = _LEN.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, with_fd: bool = False, limit: int = MAX_MESSAGE) -> tuple[bytes, list[int]]:
    fds: list[int] = []
    if with_fd:
        head, fds, _, _ = socket.recv_fds(sock, _LEN.size, 1)
        if not head:
            raise ConnectionError("peer closed the connection")
        if len(head) < _LEN.size:
            head += _recv_exact(sock, _LEN.size - len(head))
    else:
        head = _recv_exact(sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    if n > limit:
        for fd in fds:
            os.close(fd)
        raise ConnectionError(f"message of {n} bytes over the limit of {limit}")
    try:
        return _recv_exact(sock, n), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def parse_lease(body: bytes) -> list[str]:
    """The keys of a LEASE body; raises ``ValueError`` for a malformed or oversized one (checked before parsing
    where the counts allow: bounds first, then each key)."""
    if len(body) < _REQ.size:
        raise ValueError("short LEASE request")
    _, count = _REQ.unpack_from(body)
    if count > MAX_LEASE_KEYS:
        raise ValueError(f"LEASE of {count} keys (at most {MAX_LEASE_KEYS})")
    if not count * (_KEY.size + 1) <= len(body) - _REQ.size <= count * (_KEY.size + MAX_KEY_BYTES):
        raise ValueError("LEASE request length does not match its key count")
    keys, pos = [], _REQ.size
    for _ in range(count):
        (n,) = _KEY.unpack_from(body, pos)
        if not 0 < n <= MAX_KEY_BYTES:
            raise ValueError(f"key of {n} bytes")
        keys.append(body[pos + _KEY.size:pos + _KEY.size + n].decode("ascii"))
        pos += _KEY.size + n
    if pos != len(body):
        raise ValueError("trailing bytes after the LEASE keys")
    return keys


def parse_release(body: bytes) -> list[int]:
    """The lease ids of a RELEASE body; raises ``ValueError`` for a malformed or oversized one."""
    if len(body) < _REQ.size:
        raise ValueError("short RELEASE request")
    _, count = _REQ.unpack_from(body)
    if count > MAX_RELEASE_IDS or len(body) != _REQ.size + count * _ID.size:
        raise ValueError(f"RELEASE of {count} ids in {len(body)} bytes")
    return [i for (i,) in _ID.iter_unpack(body[_REQ.size:])]


# -- node side -----------------------------------------------------------------------------------------------------
class ShmServer:
    """Serves leases on a :class:`~kdn.node.tiers.shared.SharedMemoryTier` to same-host clients of ``node``.

    ``node`` provides ``authenticate(token, tenant) -> principal`` and ``account_get(transport, keys, hits,
    nbytes)``. ``start()`` binds the abstract socket (raises ``OSError`` when the name is taken) and, with
    ``protect`` (the default), marks the process non-dumpable (:func:`protect_process`); ``stop()`` closes every
    connection, which releases their leases.
    """

    def __init__(self, name: str, tier: Any, node: Any, protect: bool = True) -> None:
        self.name, self.tier, self.node, self.protect = name, tier, node, protect
        self._boot = boot_id().encode().ljust(36)
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> ShmServer:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + self.name)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        if self.protect and not protect_process():
            log.warning("shm: could not mark the node non-dumpable; other processes of its user may take every "
                        "tenant's arena from /proc/%d/fd", os.getpid())
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="kdn-shm-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
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
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning (as the bulk channel does)
                continue
            with self._lock:
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="kdn-shm-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        leases: dict[int, Any] = {}
        try:
            principal = self._hello(sock)
            next_id, sent = 1, None  # sent: the arena whose memfd this connection has received
            while principal is not None and not self._stopping:
                body, _ = _recv(sock)
                op = body[0] if body else 0
                if op == OP_LEASE:
                    keys = parse_lease(body)
                    arena = self.tier.arena(principal.tenant)
                    items = [(0, 0, 0)] * len(keys)
                    if arena is not None:
                        own = [i for i, k in enumerate(keys)
                               if k.split("/", 1)[0] == principal.tenant and principal.may_access(k)]
                        room = max(0, MAX_LEASES_PER_CONN - len(leases))
                        got = self.tier.lease_many([keys[i] for i in own[:room]])
                        for i, lease in zip(own, got):
                            if lease is None:
                                continue
                            if self.tier.arena_of(lease) is not arena:  # cannot happen: keys place objects
                                log.error("shm: %s is not in its tenant's arena; served as a miss", lease.key)
                                lease.release()
                                continue
                            leases[next_id] = lease
                            items[i] = (next_id, lease.offset, lease.nbytes)
                            next_id += 1
                    attach = arena is not None and sent is not arena
                    table = _TABLE.pack(len(keys), FLAG_FD if attach else 0,
                                        arena.arena_id.encode() if arena is not None else _NO_ARENA,
                                        arena.size if arena is not None else 0)
                    _send(sock, table + b"".join(_ITEM.pack(*it) for it in items), [arena.fd] if attach else ())
                    if attach:
                        sent = arena
                    hits = [it for it in items if it[0]]
                    self.node.account_get("shm", len(keys), len(hits), sum(it[2] for it in hits))
                elif op == OP_RELEASE:
                    for lease_id in parse_release(body):
                        lease = leases.pop(lease_id, None)
                        if lease is not None:
                            lease.release()
                else:
                    raise ValueError(f"unknown op {op}")
        except (OSError, struct.error, ValueError) as exc:
            log.debug("shm: connection dropped: %s", exc)  # client gone or broke the format (and its leases)
        except Exception:
            log.exception("shm: connection failed")
        finally:
            for lease in leases.values():
                lease.release()
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _hello(self, sock: socket.socket) -> Any:
        body, _ = _recv(sock, limit=_HELLO.size + 2 * 65535)
        magic, version, token_len, tenant_len = _HELLO.unpack_from(body)
        status, text, principal = OK, "", None
        if magic != MAGIC or version != VERSION:
            status, text = BAD, f"expected KDNS version {VERSION}"
        elif _peer_uid(sock) != os.geteuid():
            status, text = REFUSED, "shared memory is offered to processes of the node's user only"
        else:
            try:
                token = body[_HELLO.size:_HELLO.size + token_len].decode()
                tenant = body[_HELLO.size + token_len:_HELLO.size + token_len + tenant_len].decode()
                principal = self.node.authenticate(token, tenant)
            except (AuthError, InvalidRequest, UnicodeDecodeError) as exc:
                status, text = AUTH, str(exc) or "authentication failed"
        msg = text.encode()[:1024]
        _send(sock, _REPLY.pack(MAGIC, VERSION, status, self._boot, len(msg)) + msg)
        return principal if status == OK else None


# -- client side ---------------------------------------------------------------------------------------------------
class SharedBytes(np.ndarray):
    """An object's bytes inside a mapped arena (a numpy view); ``mapping`` and ``offset`` locate them."""

    mapping: _Mapping
    offset: int


def is_shared(data: Any) -> bool:
    """Whether ``data`` (a buffer from :meth:`ShmClient.get_many` or a view of one) lies in a mapped arena."""
    obj = data.obj if isinstance(data, memoryview) else data
    return isinstance(obj, SharedBytes)


class _Mapping:
    """One arena mapped read-only; ``tensor()`` a uint8 torch view, registered with CUDA on ``cuda=True``."""

    def __init__(self, fd: int, size: int, arena_id: str) -> None:
        if os.fstat(fd).st_size < size:
            raise ValueError(f"arena {arena_id} is smaller than the {size} bytes announced")
        self.arena_id, self.size = arena_id, size
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.array = np.frombuffer(self.mm, dtype=np.uint8)
        self._tensor = None
        self.registered = self._tried = False
        self.register_s = 0.0
        self._lock = threading.Lock()

    def tensor(self, cuda: bool = False) -> Any:
        with self._lock:
            if self._tensor is None:
                from kdn.wire.buffers import host_tensor

                self._tensor = host_tensor(memoryview(self.array))
            if cuda and not self._tried:
                self._tried = True  # once per mapping; unregistered memory still works, only slower
                self._register()
            return self._tensor

    def _register(self) -> None:
        import torch

        t0 = time.perf_counter()
        try:
            err = torch.cuda.cudart().cudaHostRegister(self._tensor.data_ptr(), self.size, 8)  # ...ReadOnly
            code = int(getattr(err, "value", err))
        except (RuntimeError, AttributeError, TypeError) as exc:
            code, err = -1, exc
        self.register_s = time.perf_counter() - t0
        self.registered = code == 0
        if not self.registered:
            log.warning("shm: cudaHostRegister of the %d-byte arena failed (%s); copying through host staging",
                        self.size, err)
        else:
            log.info("shm: arena %s (%d bytes) registered with CUDA in %.2f s", self.arena_id, self.size,
                     self.register_s)


class _Conn:
    """One authenticated connection: its socket, leases still referenced, and a thread that sends releases.

    Buffers' finalizers only put lease ids on a queue (safe at any point of any thread); the release thread
    sends each burst (e.g. every object of a dropped prefix) as RELEASE messages of at most MAX_RELEASE_IDS.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()  # one request (or release) on the socket at a time
        self.outstanding: set[int] = set()
        self.queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.broken = False
        self.arena_id = ""  # the arena this connection's leases name (received with the first table naming it)
        threading.Thread(target=self._release_loop, name="kdn-shm-release", daemon=True).start()

    def released(self, lease_id: int) -> None:
        """Finalizer of a leased buffer: may run in any thread, at any point (so: no blocking, no raising)."""
        self.outstanding.discard(lease_id)
        if not self.broken:
            self.queue.put(lease_id)
        elif not self.outstanding:
            self.sock.close()
            self.queue.put(None)

    def _release_loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            time.sleep(RELEASE_BATCH_S)  # let the rest of the burst arrive
            ids, stop = [first], False
            while not stop and len(ids) < MAX_RELEASE_IDS:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                stop = item is None
                if not stop:
                    ids.append(item)
            with self.lock:
                if not self.broken:
                    try:
                        _send(self.sock, _REQ.pack(OP_RELEASE, len(ids)) + b"".join(_ID.pack(i) for i in ids))
                    except OSError:
                        self.broken = True
            if stop:
                return

    def retire(self) -> None:
        """Stop using this connection; its socket closes once no leased buffer is referenced."""
        self.broken = True
        self.queue.put(None)
        if not self.outstanding:
            self.sock.close()


class ShmClient:
    """Zero-copy reads from one same-host node's shared arena of this client's tenant. Thread-safe.

    :meth:`get_many` returns read-only memoryviews into the mapping (``None`` for misses); each holds its lease
    until the view and everything derived from it are dropped. Raises :class:`Unavailable` when the node cannot
    be reached this way (not on this host, no shared tier, another user, connection lost) and ``AuthError``.
    """

    def __init__(self, address: str, *, token: str = "", tenant: str = "", timeout_s: float = 10.0,
                 retry_s: float = 30.0) -> None:
        self.name = socket_name(address)
        self.token, self.tenant, self.timeout_s, self.retry_s = token, tenant, timeout_s, retry_s
        self._down_until = 0.0
        self._conn: _Conn | None = None
        self._mapping: _Mapping | None = None
        self._lock = threading.Lock()

    def _connect(self) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(min(self.timeout_s, HANDSHAKE_TIMEOUT_S))
        try:
            sock.connect("\0" + self.name)
            if _peer_uid(sock) != os.geteuid():
                raise Unavailable(f"{self.name} is served by another user")
            token, tenant = self.token.encode(), self.tenant.encode()
            _send(sock, _HELLO.pack(MAGIC, VERSION, len(token), len(tenant)) + token + tenant)
            body, _ = _recv(sock)
            magic, _version, status, boot, msg_len = _REPLY.unpack_from(body)
            text = body[_REPLY.size:_REPLY.size + msg_len].decode("utf-8", "replace")
            if magic != MAGIC or status != OK:
                if status == AUTH and magic == MAGIC:
                    raise AuthError(text or "authentication failed")
                raise Unavailable(f"shared memory refused by {self.name}: {text or 'bad reply'}")
            if boot.decode().strip() != boot_id():
                raise Unavailable(f"{self.name} runs on another host")
            sock.settimeout(self.timeout_s)
        except (OSError, struct.error, ValueError) as exc:
            sock.close()
            raise Unavailable(f"shared memory channel {self.name} unavailable: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def get_many(self, keys: Sequence[str]) -> list[memoryview | None]:
        out: list[memoryview | None] = []
        for i in range(0, len(keys), MAX_LEASE_KEYS):
            out.extend(self._lease(keys[i:i + MAX_LEASE_KEYS]))
        return out

    def _lease(self, keys: Sequence[str]) -> list[memoryview | None]:
        encoded = [k.encode("ascii") for k in keys]
        if any(not 0 < len(k) <= MAX_KEY_BYTES for k in encoded):
            raise InvalidRequest(f"keys must be 1 to {MAX_KEY_BYTES} bytes")
        req = _REQ.pack(OP_LEASE, len(keys)) + b"".join(_KEY.pack(len(k)) + k for k in encoded)
        with self._lock:
            if self._conn is None or self._conn.broken:
                if time.monotonic() < self._down_until:
                    raise Unavailable(f"shared memory channel {self.name} failed recently")
                try:
                    self._conn = self._connect()
                except Unavailable:
                    self._down_until = time.monotonic() + self.retry_s
                    raise
            conn = self._conn
        with conn.lock:
            try:
                _send(conn.sock, req)
                body, fds = _recv(conn.sock, with_fd=True)
            except OSError as exc:
                conn.retire()
                raise Unavailable(f"shared memory channel {self.name} failed: {exc}") from exc
            try:
                mapping = self._table_mapping(conn, body, fds, len(keys))
            finally:
                for fd in fds:
                    os.close(fd)
        out: list[memoryview | None] = []
        for lease_id, offset, size in _ITEM.iter_unpack(body[_TABLE.size:]):
            if not lease_id:
                out.append(None)
                continue
            if mapping is None:
                conn.retire()
                raise Unavailable(f"{self.name} leased an object without an arena")
            conn.outstanding.add(lease_id)
            arr = mapping.array[offset:offset + size].view(SharedBytes)
            arr.mapping, arr.offset = mapping, offset
            weakref.finalize(arr, conn.released, lease_id)
            out.append(memoryview(arr) if offset + size <= mapping.size else None)
        return out

    def _table_mapping(self, conn: _Conn, body: bytes, fds: list[int], count: int) -> _Mapping | None:
        """Check a lease table's header; map the arena it attaches. The mapping its leases name (or None)."""
        try:
            n, flags, arena, size = _TABLE.unpack_from(body)
            if n != count or len(body) != _TABLE.size + count * _ITEM.size or bool(flags & FLAG_FD) != bool(fds):
                raise ValueError("malformed lease table")
            if arena == _NO_ARENA:
                return None
            arena_id = arena.decode("ascii")
            if fds:
                with self._lock:
                    if self._mapping is None or self._mapping.arena_id != arena_id:
                        self._mapping = _Mapping(fds[0], size, arena_id)
                conn.arena_id = arena_id
            mapping = self._mapping
            if conn.arena_id != arena_id or mapping is None or mapping.arena_id != arena_id:
                raise ValueError(f"lease table names arena {arena_id}, not received on this connection")
            return mapping
        except (OSError, struct.error, ValueError) as exc:
            conn.retire()
            raise Unavailable(f"{self.name} sent a bad lease table: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.retire()
