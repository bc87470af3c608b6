"""Layer-major delivery (kdn/client/layer_fetch.py) against real node processes: layer groups arrive in order and
verified, bad or late ranges are taken from the next holder, and a layer no holder can give intact is never
handed over (the stream raises, the engine recomputes).

Node ``a`` sits behind the loopback fault proxy (tests/faultproxy.py), as in tests/test_delivery.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from kdn.errors import KDNError
from tests import test_delivery
from tests.cluster import Cluster
from tests.faultproxy import FaultProxy
from tests.servers import free_port
from tests.test_delivery import TOKENS, _client, _kv, _put_direct, _wait_holders

two_nodes = test_delivery.two_nodes  # the fixture: node a behind the fault proxy, b beside it


def _layers(stream) -> torch.Tensor:
    """The whole prefix, assembled from the stream's iteration (group by group, as an engine consumes it)."""
    out = stream.empty()
    for start, end, kv in stream:
        out[start:end] = kv
    return out


def test_layer_major_delivers_identical_kv_and_returns_the_pool(two_nodes):
    cluster, _proxy, kv = two_nodes
    with _client(cluster) as client:
        stream = client.retrieve_layers(TOKENS, layer_major=True)
        assert stream.arrival is not None and stream.num_tokens == len(TOKENS)
        assert len(stream.groups()) == 4  # one section per layer: four groups, each waited for on its own
        assert torch.equal(_layers(stream), kv)
        deadline = time.monotonic() + 5
        while client._recv_pool.leased and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client._recv_pool.leased == 0
        whole = client.retrieve_layers(TOKENS)  # the default stays whole-object
        assert whole.arrival is None
        whole.close()


def test_first_layers_are_handed_over_while_later_ones_are_on_the_wire(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    node = cluster.start_node("slow", extra=["--link-gbps", "0.01"])  # ~1.25 MB/s: the 384 KiB prefix takes ~0.3 s
    cluster.wait_nodes(1)
    try:
        kv = _kv(len(TOKENS), seed=5)
        with _client(cluster) as client:
            _put_direct(client, node, TOKENS, kv)
            _wait_holders(client, TOKENS, 1)
            stream = client.retrieve_layers(TOKENS, layer_major=True)
            assert torch.equal(stream.decode_group(0, 1), kv[0:1])
            assert torch.equal(_layers(stream), kv)
            arrival = stream.arrival
            ready = arrival.ready_at
            # The groups arrived one after another, in layer order, spread over the transfer (not all at the end).
            assert all(0 < a < b for a, b in zip(ready, ready[1:])), ready
            assert ready[-1] - ready[0] > 0.4 * (ready[-1] - arrival.started), (ready, arrival.started)
    finally:
        cluster.close()


def test_corrupt_range_is_taken_from_the_next_holder(two_nodes):
    cluster, proxy, kv = two_nodes
    proxy.mode, proxy.after_bytes = "corrupt", 30_000  # one flipped byte in a's ranges, after the headers
    with _client(cluster, hedge_after_s=0) as client:
        got = _layers(client.retrieve_layers(TOKENS, layer_major=True))
        assert torch.equal(got, kv)
        assert proxy.faults >= 1
        assert client.metrics.fallbacks.labels("corrupt")._value.get() >= 1


def test_stalled_holder_is_raced_by_the_next_one(two_nodes):
    cluster, proxy, kv = two_nodes
    proxy.mode, proxy.after_bytes = "stall", 30_000  # a sends the headers and some layers, then goes silent
    with _client(cluster, hedge_after_s=0.3, timeout_s=30.0) as client:
        t0 = time.monotonic()
        got = _layers(client.retrieve_layers(TOKENS, layer_major=True))
        elapsed = time.monotonic() - t0
        assert torch.equal(got, kv)
        assert client.metrics.fallbacks.labels("hedge")._value.get() >= 1
    assert elapsed < 15.0  # long before the 30 s deadline


def test_a_layer_no_holder_gives_intact_is_never_handed_over(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start_controller()
    bulk = free_port()
    proxy = FaultProxy(bulk)
    node = cluster.start_node("solo", extra=["--bulk-port", str(bulk), "--set",
                                             f"node.advertise_bulk_port={proxy.port}"])
    cluster.wait_nodes(1)
    try:
        kv = _kv(len(TOKENS), seed=7)
        with _client(cluster, hedge_after_s=0, bulk_streams=1) as client:
            _put_direct(client, node, TOKENS, kv)
            _wait_holders(client, TOKENS, 1)
            proxy.mode, proxy.after_bytes = "corrupt", 30_000  # the only holder's range is damaged
            stream = client.retrieve_layers(TOKENS, layer_major=True)
            handed = []
            with pytest.raises(KDNError, match="could not be delivered"):
                for start, end, layer in stream:
                    handed.append((start, end))
                    assert torch.equal(layer, kv[start:end])  # whatever was handed over is intact
            assert len(handed) < len(stream.groups())
    finally:
        proxy.close()
        cluster.close()
