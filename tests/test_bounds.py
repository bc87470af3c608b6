"""Length fields never drive allocations (docs/security.md, "Bounds"): puts declaring huge objects over many bulk
connections and gRPC streams do not raise a real node process's memory; bytes in flight per tenant are bounded and
refused with a clear error while the connection stays usable."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from kdn import KDNClient, KVLayout
from kdn.client.transport import NodeClient
from kdn.format.chunk_codec import encode_chunk
from kdn.wire.bulk import MAGIC, PROTOCOL_VERSION
from kdn.wire.bulk_client import BulkClient
from tests.cluster import Cluster

LAYOUT = KVLayout(model_id="bounds-test", num_layers=2, num_kv_heads=4, head_dim=64, dtype="float16")
DECLARED = 512 << 20  # per connection: 16 of them declare 8 GiB in all
CONNECTIONS = 16


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def _pad(n: int) -> bytes:
    return bytes(-n % 64)


def _hostile_bulk_put(port: int, key: bytes, declared: int, payload: int) -> socket.socket:
    """A bulk connection that says hello, declares one object of ``declared`` bytes, sends ``payload`` of them and
    then goes quiet (the 192-byte PUT of the issue)."""
    sock = socket.create_connection(("127.0.0.1", port))
    tenant = b"default"
    hello = struct.pack("<4sHHH", MAGIC, PROTOCOL_VERSION, 0, len(tenant)) + tenant
    sock.sendall(hello + _pad(len(hello)))
    reply = sock.recv(4096)
    assert reply[:4] == MAGIC and reply[8] == 0, reply  # HELLO_OK
    table = struct.pack("<BxxxI", 2, 1) + struct.pack("<HQ", len(key), declared) + key
    sock.sendall(table + _pad(len(table)) + bytes(payload))
    return sock


@pytest.fixture
def start_node(tmp_path):
    """Start a real node process (default budgets unless ``extra`` says otherwise)."""
    cluster = Cluster(tmp_path)
    cluster.start_controller()

    def start(extra: list[str] | None = None):
        proc = cluster.start_node("n", tiers="[{kind: memory, capacity: 64MiB}]", extra=extra)
        cluster.wait_nodes(1)
        return proc
    yield start
    cluster.close()


def _wait_rss_settle(pid: int) -> int:
    time.sleep(0.5)
    return _rss_bytes(pid)


def test_declared_sizes_do_not_allocate_on_bulk_and_grpc(start_node):
    proc = start_node()  # default in-flight budgets (2 GiB per tenant): the allocation rule alone bounds memory
    pid = proc.popen.pid
    port = int(proc.ready["bulk"].rsplit(":", 1)[1])
    before = _wait_rss_settle(pid)
    socks = [_hostile_bulk_put(port, f"default/k{i}".encode(), DECLARED, 192) for i in range(CONNECTIONS)]

    # gRPC: streams whose first frame declares a huge object, then hang.
    from kdn.v1 import data_pb2, data_pb2_grpc
    from kdn.wire.rpc import make_channel

    release = threading.Event()

    def frames(i: int):
        yield data_pb2.PutFrame(key=f"default/g{i}", total_size=DECLARED, offset=0, data=bytes(192))
        release.wait(30)

    channel = make_channel(proc.ready["node"])
    stub = data_pb2_grpc.DataStub(channel)
    calls = [stub.Put.future(frames(i), timeout=60, metadata=[("x-kdn-tenant", "default")])
             for i in range(CONNECTIONS)]
    try:
        during = _wait_rss_settle(pid)
        # 32 declared objects of 512 MiB (16 GiB) cost at most their first 1 MiB buffers and thread stacks.
        assert during - before < 160 << 20, (before, during)
    finally:
        release.set()
        for sock in socks:
            sock.close()
        for call in calls:
            assert call.result(timeout=30).results[0].error == "incomplete object"
        channel.close()


def _objects(tokens: int, n: int) -> list[tuple[str, bytes]]:
    client = KDNClient(LAYOUT, controller="127.0.0.1:1", chunk_size=tokens, store_partial=False)
    try:
        toks = list(range(tokens * n))
        kv = torch.randn(LAYOUT.shape(len(toks))).to(torch.float16)
        return [(str(key), encode_chunk(kv[:, :, s.start:s.end], key=str(key), layout=LAYOUT, codec=client.codec,
                                        start=s.start)) for s, key in client.keys(toks)]
    finally:
        client.close()


def test_bytes_in_flight_per_tenant_are_refused_with_a_clear_error(start_node):
    proc = start_node(["--set", f"node.tenant_inflight_bytes={8 << 20}"])
    big = _objects(8192, 1)[0]  # 8192 tokens * 2 KiB = 16 MiB raw: over the 8 MiB in-flight limit
    small = _objects(256, 2)
    assert len(big[1]) > 8 << 20
    with BulkClient(proc.ready["bulk"], tenant="default", pool_size=1) as bulk:
        results = bulk.put_many([big, *small])
    assert results[0][0] is False and "in flight" in results[0][1] and "limit" in results[0][1]
    assert [ok for ok, _ in results[1:]] == [True, True]  # the same connection stayed in sync
    with NodeClient(proc.ready["node"], tenant="default", transport="grpc") as grpc_node:
        detailed = grpc_node.put_many_detailed([big, *_objects(128, 1)])
    assert detailed[0][0] is False and "in flight" in detailed[0][1]
    assert detailed[1] == (True, "")


def test_a_tenant_over_its_in_flight_budget_is_refused_before_its_bytes_are_held(start_node):
    """Hostile connections fill the tenant's 8 MiB budget; more declared objects are refused at once (their bytes
    read and discarded), and the node's memory stays flat."""
    proc = start_node(["--set", f"node.tenant_inflight_bytes={8 << 20}"])
    port = int(proc.ready["bulk"].rsplit(":", 1)[1])
    before = _wait_rss_settle(proc.popen.pid)
    socks = [_hostile_bulk_put(port, f"default/k{i}".encode(), DECLARED, 192) for i in range(8)]  # 8 x 1 MiB
    try:
        time.sleep(1.0)  # let the node read their tables (and allocate their first buffers)
        late = _hostile_bulk_put(port, b"default/late", 4 << 20, 4 << 20)  # all its bytes sent: refused
        late.settimeout(20)
        reply = late.recv(4096)
        assert reply[0] == 0 and struct.unpack_from("<I", reply, 4)[0] == 1  # RESP_OK, one result
        stored, msg_len = struct.unpack_from("<BH", reply, 8)
        assert stored == 0 and b"in flight" in reply[11:11 + msg_len], reply[:200]
        late.close()
        assert _wait_rss_settle(proc.popen.pid) - before < 96 << 20
    finally:
        for sock in socks:
            sock.close()
