"""Delivery across nodes: receive pool reuse, striped fetch, no head-of-line blocking behind a stalled node, bad
copies over the network refetched from the next holder, mixed layer groups, and the link emulator.

Real controller and node processes; a loopback fault proxy (tests/faultproxy.py) sits in front of one node's bulk
channel (the node advertises the proxy's port, as a node behind a Kubernetes Service would).
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from kdn import KDNClient, KVLayout
from kdn.client.transport import NodeClient
from kdn.format.chunk_codec import encode_chunk
from kdn.wire.link import TokenBucket
from kdn.wire.recv_pool import GRANULE, ReceivePool
from tests.cluster import Cluster
from tests.faultproxy import FaultProxy
from tests.servers import free_port

LAYOUT = KVLayout(model_id="delivery-test", num_layers=4, num_kv_heads=2, head_dim=32, dtype="float16")
CHUNK = 64
TOKENS = list(range(1000, 1000 + 6 * CHUNK))


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(tokens), generator=gen).to(torch.float16)


def _client(cluster: Cluster, **overrides) -> KDNClient:
    settings = dict(chunk_size=CHUNK, shared_memory=False, store_partial=False, timeout_s=20.0)
    settings.update(overrides)
    return KDNClient(LAYOUT, controller=cluster.address, **settings)


def _wait_holders(client: KDNClient, tokens: list[int], count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.lookup(tokens)
        if found.hit_tokens == len(tokens) and all(len(c.nodes) >= count for c in found.chunks):
            return
        time.sleep(0.1)
    raise TimeoutError(f"chunks not listed on {count} nodes")


def _put_direct(client: KDNClient, proc, tokens: list[int], kv: torch.Tensor, *, layer_group: int = 1) -> None:
    """Store every chunk of ``tokens`` on one node directly (replicas the test controls)."""
    objects = []
    for span, key in client.keys(tokens):
        objects.append((str(key), encode_chunk(kv[:, :, span.start:span.end], key=str(key), layout=LAYOUT,
                                               codec=client.codec, start=span.start, layer_group=layer_group)))
    with NodeClient(proc.ready["node"], tenant="default", transport="grpc") as node:
        assert node.put_many(objects) == [True] * len(objects)


@pytest.fixture
def two_nodes(tmp_path):
    """Node ``a`` (its bulk channel behind a fault proxy) and node ``b``; every chunk on ``a`` first, then ``b``."""
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    bulk_a = free_port()
    proxy = FaultProxy(bulk_a)
    node_a = cluster.start_node("a", extra=["--bulk-port", str(bulk_a),
                                            "--set", f"node.advertise_bulk_port={proxy.port}"])
    node_b = cluster.start_node("b")
    cluster.wait_nodes(2)
    kv = _kv(len(TOKENS))
    with _client(cluster) as setup:
        _put_direct(setup, node_a, TOKENS, kv)
        _wait_holders(setup, TOKENS, 1)  # a is listed first
        _put_direct(setup, node_b, TOKENS, kv)
        _wait_holders(setup, TOKENS, 2)
        assert all(c.nodes[0].node_id == "a" for c in setup.lookup(TOKENS).chunks)
    yield cluster, proxy, kv
    proxy.close()
    cluster.close()


def test_stalled_node_does_not_hold_up_chunks_another_node_has(two_nodes):
    cluster, proxy, kv = two_nodes
    proxy.mode, proxy.after_bytes = "stall", 4096  # a answers, then goes silent mid-object
    with _client(cluster, hedge_after_s=0.3, timeout_s=30.0) as client:
        t0 = time.monotonic()
        got = client.retrieve(TOKENS)
        elapsed = time.monotonic() - t0
        assert got.num_tokens == len(TOKENS)
        assert torch.equal(got.kv, kv)
        assert proxy.faults >= 1
        assert client.metrics.fallbacks.labels("hedge")._value.get() >= 1
    # The stalled stream never delivered; the request ended long before its 30 s deadline.
    assert elapsed < 15.0


def test_corrupt_copy_over_the_network_is_refetched_from_the_next_holder(two_nodes):
    cluster, proxy, kv = two_nodes
    proxy.mode, proxy.after_bytes = "corrupt", 20_000  # one flipped byte inside the first object's payload
    with _client(cluster, hedge_after_s=0) as client:
        got = client.retrieve(TOKENS)
        assert got.num_tokens == len(TOKENS)
        assert torch.equal(got.kv, kv)
        assert proxy.faults >= 1
        assert client.metrics.fallbacks.labels("corrupt")._value.get() >= 1


def test_dropped_bulk_stream_falls_back_to_grpc_and_delivers_intact_kv(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    bulk = free_port()
    proxy = FaultProxy(bulk)
    node = cluster.start_node("solo", extra=["--bulk-port", str(bulk), "--set",
                                             f"node.advertise_bulk_port={proxy.port}"])
    cluster.wait_nodes(1)
    try:
        kv = _kv(len(TOKENS), seed=3)
        object_bytes = LAYOUT.bytes_per_token * CHUNK
        proxy.mode, proxy.after_bytes = "drop", int(2.5 * object_bytes)  # every connection is cut in object 3
        with _client(cluster, bulk_streams=1) as client:
            _put_direct(client, node, TOKENS, kv)
            _wait_holders(client, TOKENS, 1)
            got = client.retrieve(TOKENS)
            assert proxy.faults >= 1
            # The bulk channel failed (retried once on a fresh connection); the same call went over gRPC.
            assert got.num_tokens == len(TOKENS) and torch.equal(got.kv, kv)
            assert client._recv_pool.leased == 0  # buffers of the failed receive came back
    finally:
        proxy.close()
        cluster.close()


def test_retrieves_reuse_the_receive_pool_and_hand_it_back(two_nodes):
    cluster, _, kv = two_nodes
    with _client(cluster, bulk_streams=2) as client:
        for _ in range(3):
            got = client.retrieve(TOKENS)
            assert torch.equal(got.kv, kv)
        pool = client._recv_pool
        assert pool is not None and not pool.pinned  # no CUDA here
        assert pool.leased == 0  # every buffer came back
        assert pool.reused >= 2 * (len(TOKENS) // CHUNK)  # the second and third retrieve allocated nothing
        assert pool.transient == 0
        # A stream that is dropped without being closed gives its buffers back too.
        stream = client.retrieve_layers(TOKENS)
        assert stream.num_tokens == len(TOKENS) and pool.leased > 0
        del stream
        gc.collect()
        assert pool.leased == 0


def test_chunks_stored_with_different_layer_groups_decode_together(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    node = cluster.start_node("n")
    cluster.wait_nodes(1)
    try:
        kv = _kv(len(TOKENS), seed=5)
        with _client(cluster) as client:
            half = 3 * CHUNK
            _put_direct(client, node, TOKENS[:half], kv[:, :, :half], layer_group=1)
            objects = []
            for span, key in client.keys(TOKENS)[3:]:
                objects.append((str(key), encode_chunk(kv[:, :, span.start:span.end], key=str(key), layout=LAYOUT,
                                                       codec=client.codec, start=span.start, layer_group=2)))
            with NodeClient(node.ready["node"], tenant="default", transport="grpc") as direct:
                assert direct.put_many(objects) == [True] * len(objects)
            _wait_holders(client, TOKENS, 1)
            stream = client.retrieve_layers(TOKENS)
            assert stream.groups() == [(0, 2), (2, 4)]  # the boundaries both kinds of object share
            stream.close()
            got = client.retrieve(TOKENS)
            assert got.num_tokens == len(TOKENS) and torch.equal(got.kv, kv)
    finally:
        cluster.close()


def test_receive_pool_reuses_by_size_class_and_bounds_its_memory():
    pool = ReceivePool(3 * GRANULE)
    a = pool.lease(GRANULE // 2)
    assert len(a.view) == GRANULE // 2 and a.pooled and not a.view.readonly
    a.view[:4] = b"abcd"
    pool.release(a)
    pool.release(a)  # idempotent
    b = pool.lease(GRANULE - 100)  # same size class: the same buffer again
    assert pool.reused == 1 and bytes(b.view[:4]) == b"abcd"
    c = pool.lease(2 * GRANULE)
    assert c.pooled and pool.allocated == 3 * GRANULE
    d = pool.lease(10)  # over capacity: a transient buffer, never a wait
    assert not d.pooled and pool.transient == 1
    for lease in (b, c, d):
        pool.release(lease)
    assert pool.leased == 0 and pool.allocated == 3 * GRANULE
    pool.clear()
    assert pool.allocated == 0


def test_token_bucket_paces_to_its_rate():
    bucket = TokenBucket(0.08, burst_bytes=64 << 10)  # 10 MB/s
    t0 = time.monotonic()
    for _ in range(20):
        bucket.take(100_000)  # 2 MB in all
    elapsed = time.monotonic() - t0
    assert elapsed >= (2_000_000 - (64 << 10)) / 10e6 * 0.95  # can never beat the rate (beyond one burst)
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_objects_land_on_the_gpu_through_the_pinned_pool(two_nodes):
    cluster, _, kv = two_nodes
    with _client(cluster) as client:
        got = client.retrieve(TOKENS, device="cuda")
        assert got.kv.is_cuda and torch.equal(got.kv.cpu(), kv)
        assert client._recv_pool.pinned and client._recv_pool.leased == 0
        stream = client.retrieve_layers(TOKENS)  # host decode of the same pinned objects
        assert stream.writes_device
        out = torch.empty(LAYOUT.shape(len(TOKENS), 2), dtype=torch.float16, device="cuda")
        stream.decode_group(1, 3, out=out)
        stream.close()
        assert torch.equal(out.cpu(), kv[1:3])


BIG = KVLayout(model_id="delivery-big", num_layers=16, num_kv_heads=8, head_dim=128, dtype="float16")


@pytest.mark.parametrize("policy", ["srpt", "fifo"])
def test_short_fetch_overtakes_a_long_one_under_srpt_not_fifo(tmp_path, policy):
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    cluster.start_node("slow", tiers="[{kind: memory, capacity: 512MiB}]", extra=["--link-gbps", "0.8"])
    cluster.wait_nodes(1)
    try:
        long_tokens, short_tokens = list(range(24 * CHUNK)), list(range(10**6, 10**6 + CHUNK))
        settings = dict(chunk_size=CHUNK, shared_memory=False, store_partial=False, timeout_s=60.0, bulk_streams=1,
                        transfer_policy=policy)
        with KDNClient(BIG, controller=cluster.address, **settings) as client:
            for tokens in (long_tokens, short_tokens):
                kv = torch.zeros(BIG.shape(len(tokens)), dtype=torch.float16)
                assert client.store(tokens, kv, copy=False).result(120).stored == len(tokens) // CHUNK
            finished: dict[str, float] = {}

            def fetch(name, tokens):
                got = client.retrieve(tokens)
                assert got.num_tokens == len(tokens)
                finished[name] = time.monotonic()

            import threading

            long = threading.Thread(target=fetch, args=("long", long_tokens))
            started = time.monotonic()
            long.start()
            time.sleep(0.3)  # the long fetch (about 1 s at 0.8 Gbit/s) is streaming
            fetch("short", short_tokens)
            long.join()
        # SRPT: the short fetch takes the stream at the long one's next request and ends well before it; FIFO:
        # it waits behind the whole long fetch and ends with it.
        margin = 0.25 * (finished["long"] - started)
        assert (finished["short"] < finished["long"] - margin) == (policy == "srpt"), (finished, started)
    finally:
        cluster.close()


@pytest.mark.parametrize("policy", ["srpt", "fifo"])
def test_node_sends_a_short_reply_before_queued_long_ones_under_srpt(tmp_path, policy):
    """The node side of the scheduler: one send slot, a long fetch keeping 8 replies queued, then another client's
    one-chunk fetch. SRPT sends it at the next 4 MiB quantum; FIFO sends it after the replies queued before it."""
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    cluster.start_node("slow", tiers="[{kind: memory, capacity: 512MiB}]",
                       extra=["--link-gbps", "0.8", "--set", "node.send_slots=1",
                              "--set", f"node.send_policy={policy}"])
    cluster.wait_nodes(1)
    try:
        long_tokens, short_tokens = list(range(24 * CHUNK)), list(range(10**6, 10**6 + CHUNK))
        settings = dict(chunk_size=CHUNK, shared_memory=False, store_partial=False, timeout_s=60.0)
        with KDNClient(BIG, controller=cluster.address, bulk_streams=8, **settings) as big, \
                KDNClient(BIG, controller=cluster.address, bulk_streams=1, **settings) as small:
            for client, tokens in ((big, long_tokens), (small, short_tokens)):
                kv = torch.zeros(BIG.shape(len(tokens)), dtype=torch.float16)
                assert client.store(tokens, kv, copy=False).result(120).stored == len(tokens) // CHUNK
            finished: dict[str, float] = {}

            def fetch(name, client, tokens):
                got = client.retrieve(tokens)
                assert got.num_tokens == len(tokens)
                finished[name] = time.monotonic()

            import threading

            long = threading.Thread(target=fetch, args=("long", big, long_tokens))
            started = time.monotonic()
            long.start()
            time.sleep(0.3)  # the long fetch (about 1 s at 0.8 Gbit/s) has its 8 requests queued at the node
            asked = time.monotonic()
            fetch("short", small, short_tokens)
            long.join()
        # SRPT: the short reply waits at most one quantum (~0.05 s here); FIFO: behind ~8 queued replies (~0.5 s).
        waited, whole = finished["short"] - asked, finished["long"] - started
        assert (waited < 0.25 * whole) == (policy == "srpt"), (waited, whole)
    finally:
        cluster.close()


def test_store_before_any_node_registered_fails_with_a_reason(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    try:
        with _client(cluster) as client:
            result = client.store(TOKENS, _kv(len(TOKENS)), copy=False).result(30)
            assert result.stored == 0 and result.failed == len(TOKENS) // CHUNK
            assert "no node" in result.error, result
    finally:
        cluster.close()
