"""Controller replicas through a real redis-server: one serves (holds the lease), the other answers UNAVAILABLE;
kill -9 of the serving one and the cluster keeps serving through the other (nodes and clients fail over to the next
listed address), pins survive, lookups never name a wrong location meanwhile, Redis outages step the active replica
down rather than letting two serve."""

from __future__ import annotations

import time
from contextlib import closing

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kdn.client import KDNClient
from kdn.client.control import ControlClient
from kdn.errors import Unavailable
from kdn.format.layout import KVLayout
from kdn.wire.rpc import make_channel
from tests.cluster import start_kdn
from tests.servers import require, start_redis, stop

pytestmark = pytest.mark.timeout(180)

LAYOUT = KVLayout("ha-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
CHUNK = 16


def _controller(tmp_path, name: str, redis_url: str):
    return start_kdn(["controller", "--port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path / name),
                      "--set", f"controller.redis={redis_url}", "--set", "controller.lease_ttl_s=1.0",
                      "--set", "controller.node_timeout_s=3"], tmp_path / f"{name}.log")


def _ready(address: str) -> str:
    """The readiness of ``kdn.v1.Control`` in the standard gRPC health service ('' when unreachable)."""
    with make_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="kdn.v1.Control"), timeout=2)
        except grpc.RpcError:
            return ""
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _live(address: str) -> str:
    with make_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _kv(tokens: int, seed: float) -> torch.Tensor:
    pos = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1, 1)
    return (pos * 0.01 + seed).expand(LAYOUT.shape(tokens)).to(torch.float16).contiguous()


@pytest.fixture
def replicas(tmp_path):
    require("redis-server")
    redis_proc, url = start_redis(tmp_path)
    procs = []
    try:
        a = _controller(tmp_path, "ctl-a", url)
        procs.append(a)
        _wait(lambda: _ready(a.ready["controller"]) == "SERVING", 10, "replica a to serve")
        b = _controller(tmp_path, "ctl-b", url)
        procs.append(b)
        addresses = f"{a.ready['controller']},{b.ready['controller']}"
        node = start_kdn(["node", "--port", "0", "--bulk-port", "0", "--metrics-port", "-1", "--controller",
                          addresses, "--node-id", "n1", "--data-dir", str(tmp_path / "n1"),
                          "--set", "node.tiers=[{kind: memory, capacity: 64MiB}]",
                          "--set", "node.heartbeat_interval_s=0.3"], tmp_path / "n1.log")
        procs.append(node)
        yield {"a": a, "b": b, "node": node, "addresses": addresses, "redis": redis_proc, "url": url,
               "tmp": tmp_path}
    finally:
        for proc in reversed(procs):
            proc.stop()
        stop(redis_proc)


def test_one_replica_serves_and_the_other_refuses(replicas):
    a, b = replicas["a"].ready["controller"], replicas["b"].ready["controller"]
    assert _ready(a) == "SERVING"
    assert _ready(b) == "NOT_SERVING"
    assert _live(b) == "SERVING"  # alive, just not the serving replica
    with closing(ControlClient(b, timeout_s=5)) as standby, pytest.raises(Unavailable, match="standby"):
        standby.call("Stats")
    with closing(ControlClient(f"{b},{a}", timeout_s=5)) as both:
        assert both.call("Stats").uptime_s >= 0  # moved past the standby to the serving replica
        assert both.current == a


def test_kill_active_replica_cluster_keeps_serving(replicas):
    a, b = replicas["a"], replicas["b"]
    tokens = list(range(4 * CHUNK))
    with KDNClient(LAYOUT, controller=replicas["addresses"], chunk_size=CHUNK, timeout_s=5.0,
                   receive_pool_bytes=0, shared_memory=False, store_partial=False) as client:
        _wait(lambda: client.refresh_nodes(), 15, "the node to register")
        kv = _kv(len(tokens), 0.5)
        assert client.store(tokens, kv).result(30).stored == 4
        keys = [str(k) for _, k in client.keys(tokens)]
        assert client._call("Pin", keys=keys[:2]).changed == 2
        assert client.lookup(tokens).hit_tokens == len(tokens)

        a.kill()  # kill -9 of the serving replica
        killed = time.monotonic()
        # every answer meanwhile is a miss or the right (only) location, never an error to the caller
        node_address = replicas["node"].ready["node"]

        def served() -> bool:
            found = client.lookup(tokens)
            assert all(h.nodes[0].address == node_address for h in found.chunks)
            return found.source == "controller" and found.hit_tokens == len(tokens)

        _wait(served, 20, "the standby to take over with the node's inventory")
        failover_s = time.monotonic() - killed
        print(f"failover: first full hit through the new active replica {failover_s:.2f} s after kill -9")
        assert _ready(b.ready["controller"]) == "SERVING"
        got = client.retrieve(tokens)
        assert got.num_tokens == len(tokens) and torch.equal(got.kv, kv)
        stats = client._call("Stats")
        assert stats.pinned == 2  # pins were written through to Redis
        assert stats.keys == 4


def test_redis_outage_steps_the_active_replica_down_and_back(replicas):
    a, b = replicas["a"].ready["controller"], replicas["b"].ready["controller"]
    stop(replicas["redis"])
    # the lease cannot be renewed: the active replica stops serving before anyone else could hold it
    _wait(lambda: _ready(a) == "NOT_SERVING", 10, "replica a to step down")
    assert _ready(b) == "NOT_SERVING"
    port = int(replicas["url"].rsplit(":", 1)[1].split("/")[0])
    replicas["redis"] = start_redis(replicas["tmp"] / "again", port)[0]
    _wait(lambda: "SERVING" in (_ready(a), _ready(b)), 10, "a replica to serve again")
    states = sorted([_ready(a), _ready(b)])
    assert states == ["NOT_SERVING", "SERVING"]  # exactly one serves


def test_health_port_serves_plaintext_health_only(tmp_path):
    """The kubelet's gRPC probes cannot speak TLS: ``controller.health_port`` serves the health service alone."""
    from kdn.config import KDNConfig
    from kdn.controller.servicer import Controller
    from kdn.v1 import control_pb2, control_pb2_grpc

    config = KDNConfig()
    config.data_dir = str(tmp_path)
    config.controller.port = 0
    config.controller.health_port = 0
    ctl = Controller(config).start()
    try:
        address = f"127.0.0.1:{ctl.health_port}"
        assert _ready(address) == "SERVING"  # one controller without Redis always serves
        assert _live(address) == "SERVING"
        with make_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            control_pb2_grpc.ControlStub(channel).Stats(control_pb2.ControllerStatsRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _ready(ctl.address) == "SERVING"
    finally:
        ctl.stop()
