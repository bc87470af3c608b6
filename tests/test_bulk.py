"""The bulk channel over real sockets on 127.0.0.1: round trips, errors, hostile peers, and the transfer bench."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from kdn.errors import AuthError, CapacityError, DeadlineExceeded, InvalidRequest, Unavailable
from kdn.node.tiers.base import Buffer
from kdn.wire import bulk
from kdn.wire.bulk_client import BulkClient
from kdn.wire.bulk_server import BulkServer

MAX_OBJECT = 32 << 20


class DictHandler:
    """An in-memory node: token ``good`` (or empty) is accepted; ``fail`` keys make the handler raise."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.lock = threading.Lock()

    def authenticate(self, token: str, tenant: str) -> str:
        if token not in ("", "good"):
            raise AuthError("invalid token")
        return tenant or "default"

    def get_many(self, principal: str, keys: list[str]) -> list[Buffer | None]:
        if "fail" in keys:
            raise CapacityError("busy right now")
        with self.lock:
            return [self.objects.get((principal, k)) for k in keys]

    def put_many(self, principal: str, items: list[tuple[str, Buffer]]) -> list[tuple[bool, str]]:
        out = []
        with self.lock:
            for key, data in items:
                if key == "reject":
                    out.append((False, "rejected by handler"))
                    continue
                self.objects.setdefault((principal, key), bytes(data))
                out.append((True, ""))
        return out


@pytest.fixture
def server() -> Iterator[BulkServer]:
    srv = BulkServer("127.0.0.1", 0, DictHandler(), max_object_bytes=MAX_OBJECT, io_timeout_s=2.0)
    srv.start()
    yield srv
    srv.stop(0)


def _client(srv: BulkServer, **kw) -> BulkClient:
    return BulkClient(f"127.0.0.1:{srv.port}", **{"timeout_s": 5.0, **kw})


def _raw(srv: BulkServer, hello: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=3.0)
    if hello:
        sock.sendall(bulk._block(bulk._HELLO.pack(bulk.MAGIC, bulk.PROTOCOL_VERSION, 0, 0)))
        reply = _recv_exact(sock, bulk.ALIGN)
        assert bulk._HELLO_REPLY.unpack_from(reply)[2] == bulk.HELLO_OK
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def _server_alive(srv: BulkServer) -> None:
    with _client(srv) as c:
        assert c.put_many([("alive", b"x")]) == [(True, "")]
        assert c.get_many(["alive"]) == [bytearray(b"x")]


@pytest.mark.parametrize("size", [1, 1 << 20, 20 << 20])
def test_round_trip_bit_identical(server: BulkServer, size: int) -> None:
    data = os.urandom(size)
    with _client(server) as c:
        assert c.put_many([("k", data)]) == [(True, "")]
        (got,) = c.get_many(["k"])
    assert isinstance(got, bytearray) and got == data


def test_misses_and_batches(server: BulkServer) -> None:
    items = [(f"key-{i}", os.urandom(i * 997 % 70000 + 1)) for i in range(300)]
    with _client(server) as c:
        assert c.put_many(items) == [(True, "")] * len(items)
        keys = ["missing-0", *(k for k, _ in items), "missing-1"]
        got = c.get_many(keys)
        assert got[0] is None and got[-1] is None
        assert [bytes(g) for g in got[1:-1]] == [d for _, d in items]
        assert c.get_many([]) == [] and c.put_many([]) == []


def test_tenant_comes_from_the_connection(server: BulkServer) -> None:
    with _client(server, tenant="a") as a, _client(server, tenant="b") as b:
        a.put_many([("k", b"tenant a")])
        assert b.get_many(["k"]) == [None]
        assert a.get_many(["k"]) == [bytearray(b"tenant a")]


def test_per_item_put_results_and_handler_errors(server: BulkServer) -> None:
    with _client(server, pool_size=1) as c:
        assert c.put_many([("ok", b"1"), ("reject", b"2")]) == [(True, ""), (False, "rejected by handler")]
        with pytest.raises(CapacityError, match="busy right now"):
            c.get_many(["ok", "fail"])
        assert c.get_many(["ok"]) == [bytearray(b"1")]  # the connection stayed in sync and usable


def test_alloc_hook_receives_into_caller_buffers(server: BulkServer) -> None:
    data = os.urandom(100_000)
    pool = bytearray(200_000)
    with _client(server) as c:
        c.put_many([("k", data)])
        (got,) = c.get_many(["k"], alloc=lambda n: memoryview(pool)[:n])
    assert bytes(got) == data and pool[:100_000] == data


def test_ranges_land_in_caller_buffers_clamped_at_the_object_end(server: BulkServer) -> None:
    data = os.urandom(300_000)
    with _client(server) as c:
        c.put_many([("k", data)])
        bufs = [memoryview(bytearray(n)) for n in (100, 200_000, 50_000, 10, 10)]
        sizes = c.get_ranges([("k", 0, 100), ("k", 70_000, 200_000), ("k", 280_000, 50_000), ("k", 300_000, 10),
                              ("absent", 0, 10)], bufs)
        assert sizes == [100, 200_000, 20_000, -1, -1]  # clamped at the end; past the end and absent: misses
        assert bytes(bufs[0]) == data[:100] and bytes(bufs[1]) == data[70_000:270_000]
        assert bytes(bufs[2][:20_000]) == data[280_000:]
        with pytest.raises(InvalidRequest, match="writable bytes"):
            c.get_ranges([("k", 0, 100)], [memoryview(bytearray(99))])
        assert c.get_many(["k"]) == [bytearray(data)]  # the connection stayed in sync
    sock = _raw(server)  # a range over the object limit is a protocol error, and the server lives on
    sock.sendall(bulk._block(bulk._REQ.pack(bulk.OP_RANGES, 1) + bulk._RANGE_ITEM.pack(1, 0, MAX_OBJECT + 1) + b"k"))
    status, _, _ = bulk._RESP.unpack(_recv_exact(sock, bulk._RESP.size))
    assert status == bulk.RESP_PROTOCOL
    sock.close()
    _server_alive(server)


def test_auth_failure(server: BulkServer) -> None:
    with _client(server, token="bad") as c, pytest.raises(AuthError, match="invalid token"):
        c.get_many(["k"])
    _server_alive(server)


def test_object_over_max_size_refused(server: BulkServer) -> None:
    with _client(server) as c:
        res = c.put_many([("small", b"s"), ("big", bytes(MAX_OBJECT + 1))])
        assert res[0] == (True, "") and res[1][0] is False and "limit" in res[1][1]
        assert c.get_many(["big", "small"]) == [None, bytearray(b"s")]
    sock = _raw(server)  # a peer that ignores the limit gets a protocol error and is disconnected
    sock.sendall(bulk._REQ.pack(bulk.OP_PUT, 1) + bulk._PUT_ITEM.pack(1, MAX_OBJECT + 1) + b"k")
    status, _, _ = bulk._RESP.unpack(sock.recv(bulk._RESP.size))
    assert status == bulk.RESP_PROTOCOL
    sock.close()
    _server_alive(server)


def test_concurrent_clients_from_threads(server: BulkServer) -> None:
    shared = _client(server, pool_size=3)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            own = _client(server, pool_size=1)
            for j in range(20):
                data = os.urandom(1000 + i * 100 + j)
                for c in (own, shared):
                    key = f"t{i}-{j}-{id(c)}"
                    assert c.put_many([(key, data)]) == [(True, "")]
                    assert c.get_many([key]) == [data]
            own.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    shared.close()
    assert not errors


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage instead of a hello
    bulk._HELLO.pack(bulk.MAGIC, 99, 0, 0),  # unknown version
    bulk._HELLO.pack(bulk.MAGIC, bulk.PROTOCOL_VERSION, 60000, 0),  # absurd token length
    bulk._HELLO.pack(bulk.MAGIC, bulk.PROTOCOL_VERSION, 10, 0) + b"abc",  # truncated hello
])
def test_hostile_hello(server: BulkServer, payload: bytes) -> None:
    sock = _raw(server, hello=False)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    try:
        sock.recv(4096)
    except OSError:
        pass
    sock.close()
    _server_alive(server)


@pytest.mark.parametrize("request_bytes", [
    os.urandom(64),  # garbage after a valid hello
    bulk._REQ.pack(99, 1),  # unknown op
    bulk._REQ.pack(bulk.OP_GET, 0xFFFFFFFF),  # absurd count
    bulk._REQ.pack(bulk.OP_GET, 1) + bulk._KEY.pack(65535),  # absurd key length
    bulk._REQ.pack(bulk.OP_GET, 1) + bulk._KEY.pack(0),  # empty key
    bulk._REQ.pack(bulk.OP_PUT, 1) + bulk._PUT_ITEM.pack(1, 2**63) + b"k",  # absurd object size
    bulk._REQ.pack(bulk.OP_PUT, 2) + bulk._PUT_ITEM.pack(1, 1000) + b"k" + b"x" * 10,  # truncated mid-object
    bulk._REQ.pack(bulk.OP_GET, 3) + bulk._KEY.pack(5) + b"ab",  # truncated key
    bulk._REQ.pack(bulk.OP_GET, 1) + bulk._KEY.pack(2) + b"\xff\xfe",  # non-ASCII key
    bulk._REQ.pack(bulk.OP_RANGES, 1) + bulk._RANGE_ITEM.pack(1, 2**63, 2**63) + b"k",  # absurd range
    bulk._REQ.pack(bulk.OP_RANGES, 2) + bulk._RANGE_ITEM.pack(1, 0, 10) + b"k",  # truncated range table
])
def test_hostile_requests(server: BulkServer, request_bytes: bytes) -> None:
    sock = _raw(server)
    sock.sendall(request_bytes)
    sock.shutdown(socket.SHUT_WR)  # also covers a client that disconnects mid-frame
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()
    _server_alive(server)


def test_random_frames_never_take_the_server_down(server: BulkServer) -> None:
    import random

    rng = random.Random(1234)
    for _ in range(60):
        sock = _raw(server)
        head = bulk._REQ.pack(rng.choice([bulk.OP_GET, bulk.OP_PUT, rng.randrange(256)]), rng.randrange(5))
        sock.sendall(head + rng.randbytes(rng.randrange(200)))
        sock.close()
    _server_alive(server)


def test_client_rejects_a_hostile_server() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        sock, _ = listener.accept()
        sock.recv(4096)
        sock.sendall(bulk._block(bulk._HELLO_REPLY.pack(bulk.MAGIC, 1, bulk.HELLO_OK, 100, 0)))
        sock.recv(4096)
        sock.sendall(bulk._block(bulk._RESP.pack(bulk.RESP_OK, 0, 1), bulk._GET_ITEM.pack(bulk.ITEM_HIT, 1 << 40)))
        time.sleep(0.5)
        sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(Unavailable, match="malformed item table"):
            BulkClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout_s=2.0).get_many(["k"])
    finally:
        thread.join(5)
        listener.close()


def test_client_disconnects_mid_object(server: BulkServer) -> None:
    sock = _raw(server)
    sock.sendall(bulk._REQ.pack(bulk.OP_PUT, 1) + bulk._PUT_ITEM.pack(1, 8 << 20) + b"k" + bytes(1 << 20))
    sock.close()
    _server_alive(server)
    with _client(server) as c:
        assert c.get_many(["k"]) == [None]


def test_stalled_client_times_out_on_the_server(server: BulkServer) -> None:
    sock = _raw(server)
    sock.sendall(bulk._REQ.pack(bulk.OP_GET, 2))  # then nothing: io_timeout_s (2 s) closes it
    sock.settimeout(5.0)
    start = time.monotonic()
    assert sock.recv(1) == b""
    assert time.monotonic() - start < 4.0
    sock.close()


def test_idle_connections_outlive_io_timeout_until_idle_timeout() -> None:
    srv = BulkServer("127.0.0.1", 0, DictHandler(), max_object_bytes=MAX_OBJECT, io_timeout_s=0.2,
                     idle_timeout_s=0.8)
    srv.start()
    try:
        sock = _raw(srv)
        time.sleep(0.4)  # idle past io_timeout_s: still open
        sock.sendall(bulk._block(bulk._REQ.pack(bulk.OP_GET, 1), bulk._KEY.pack(1), b"k"))
        reply = _recv_exact(sock, bulk.ALIGN)  # header and item table, padded to 64 bytes
        assert bulk._RESP.unpack_from(reply) == (bulk.RESP_OK, 0, 1)
        assert bulk._GET_ITEM.unpack_from(reply, bulk._RESP.size) == (bulk.ITEM_MISS, 0)
        sock.settimeout(3.0)
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed once idle past idle_timeout_s
        assert 0.5 < time.monotonic() - start < 2.0
        sock.close()
    finally:
        srv.stop(0)


def test_server_stopped_client_raises_unavailable() -> None:
    srv = BulkServer("127.0.0.1", 0, DictHandler(), max_object_bytes=MAX_OBJECT)
    port = srv.start()
    c = BulkClient(f"127.0.0.1:{port}", timeout_s=2.0)
    assert c.put_many([("k", b"v")]) == [(True, "")]  # leaves a pooled connection
    srv.stop(1.0)
    with pytest.raises(Unavailable):
        c.get_many(["k"])
    with pytest.raises(Unavailable):
        BulkClient(f"127.0.0.1:{port}", timeout_s=2.0).get_many(["k"])
    srv2 = BulkServer("127.0.0.1", port, DictHandler(), max_object_bytes=MAX_OBJECT)  # a restarted node
    srv2.start()
    try:
        assert c.get_many(["k"]) == [None]  # reconnects transparently
    finally:
        srv2.stop(0)
        c.close()


def test_deadline_when_server_never_answers() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts into its backlog, never replies
    try:
        c = BulkClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            c.get_many(["k"])
        assert time.monotonic() - start < 2.0
    finally:
        listener.close()


def test_connection_cap_and_graceful_stop() -> None:
    srv = BulkServer("127.0.0.1", 0, DictHandler(), max_object_bytes=MAX_OBJECT, max_connections=1)
    srv.start()
    first = _client(srv, pool_size=1)
    first.put_many([("k", b"v")])  # holds the only connection slot
    with pytest.raises(Unavailable, match="refused"):
        _client(srv).get_many(["k"])
    start = time.monotonic()
    srv.stop(5.0)  # idle connections are closed at once
    assert time.monotonic() - start < 2.0
    first.close()


def test_wire_layout_keeps_payloads_aligned() -> None:
    assert bulk.MAGIC == b"KDNB" and bulk._HELLO.size == 10 and bulk._REQ.size == 8
    assert struct.calcsize("<BQ") == bulk._GET_ITEM.size == 9
    assert len(bulk._block(b"x" * 65)) == 128 and len(bulk._block(b"x" * 64)) == 64
    parts = bulk._payload_parts([memoryview(b"abc"), None, memoryview(bytes(64))])
    assert [len(p) for p in parts] == [3, 61, 64, 0]


def test_stream_is_64_byte_framed(server: BulkServer) -> None:
    sock = _raw(server)
    payload = os.urandom(100)
    key = b"aligned"
    sock.sendall(bulk._block(bulk._REQ.pack(bulk.OP_PUT, 1), bulk._PUT_ITEM.pack(len(key), 100), key)
                 + payload + bytes(28))
    assert bulk._RESP.unpack_from(_recv_exact(sock, 64)) == (bulk.RESP_OK, 0, 1)
    sock.sendall(bulk._block(bulk._REQ.pack(bulk.OP_GET, 1), bulk._KEY.pack(len(key)), key))
    reply = _recv_exact(sock, 64 + 128)
    assert bulk._GET_ITEM.unpack_from(reply, 8) == (bulk.ITEM_HIT, 100)
    assert reply[64:164] == payload and reply[164:] == bytes(28)
    sock.close()


def test_transfer_bench_smoke(tmp_path, capsys) -> None:
    from kdn.cli.main import main

    out = tmp_path / "bench.json"
    assert main(["bench", "transfer", "--sizes", "0.25,1", "--repeat", "2", "--json", str(out),
                 "--prefix-mib", "64", "--streams", "2"]) == 0
    assert "ratio" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved) >= {"rows", "hardware", "date"}
    rows = saved["rows"]
    prefix = [r for r in rows if r["path"].endswith("-prefix")]
    rows = [r for r in rows if r not in prefix]
    assert {r["path"] for r in rows} == {"raw", "raw-fresh", "bulk-bare", "bulk-tls", "bulk", "shm", "grpc"}
    assert len(rows) == 2 * 2 * 7  # sizes x ops x paths
    # Whole-prefix rows: KDNClient over TCP (whole objects, layer-major) with 1 and 2 streams, each against raw
    # sockets with as many.
    assert sorted((r["path"], r["streams"]) for r in prefix) == [
        ("kdn-layers-prefix", 1), ("kdn-layers-prefix", 2), ("kdn-prefix", 1), ("kdn-prefix", 2),
        ("raw-prefix", 1), ("raw-prefix", 2)]
    assert all(r["mib"] == 64 and r["gbps"] > 0 for r in prefix)
    assert all(r["gbps"] > 0 and r["ratio"] > 0 and r["p50_ms"] > 0 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["path"] == "raw")
