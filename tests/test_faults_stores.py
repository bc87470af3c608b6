"""Faults of the stores under a real node, with real parts: redis-server (the node's Redis tier and the controller
replicas' lease on the same server) hung, killed and restarted; moto's S3 server hung and killed; the disk tier's
filesystem full (a small tmpfs of its own, mounted in a private mount namespace). Every request ends in a correct
prefix or a miss within its deadline (never an error, a wrong hit or a crashed node), readiness (gRPC health
``kdn.v1.Data``) follows the store, and everything comes back when the store does. Also the node's health service
itself and the controller-restart rebuild of ``kdn bench load --rebuild-chunks`` at CI size."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kdn.client import KDNClient
from kdn.client.control import ControlClient
from kdn.format.layout import KVLayout
from kdn.node.health import HEALTH_SERVICE
from kdn.wire.rpc import make_channel
from tests.cluster import Cluster, Proc, start_kdn
from tests.servers import _redis_args, _spawn, _wait, die_with_parent, free_port, require, start_moto, stop

pytestmark = pytest.mark.timeout(240)

LAYOUT = KVLayout("faults-stores", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
CHUNK = 16
CHUNKS = 8  # per prompt; a chunk object is about 4.3 KB
MEMORY = "40KiB"  # holds 9 chunks: the first prompt's chunks are left in the lower tier only
TIMEOUT_S = 3.0


def _kv(i: int) -> torch.Tensor:
    tokens = CHUNKS * CHUNK
    pos = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1, 1)
    return (pos * 0.01 + i * 0.1).expand(LAYOUT.shape(tokens)).to(torch.float16).contiguous()


def _prompt(i: int) -> list[int]:
    return [(i * 7919 + t * 31) % 30_000 for t in range(CHUNKS * CHUNK)]


def _client(address: str) -> KDNClient:
    return KDNClient(LAYOUT, controller=address, chunk_size=CHUNK, timeout_s=TIMEOUT_S, receive_pool_bytes=0,
                     shared_memory=False, store_partial=False, hedge_after_s=0.5)


def _health(address: str, service: str = HEALTH_SERVICE) -> str:
    """The status of ``service`` in the standard gRPC health service ('' when unreachable)."""
    with make_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=2)
        except grpc.RpcError:
            return ""
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _fetch(client: KDNClient, i: int) -> int:
    """Retrieve prompt ``i``: it must end within its deadline in a correct prefix (or a miss); returns tokens."""
    started = time.monotonic()
    got = client.retrieve(_prompt(i))
    took = time.monotonic() - started
    assert took < 3 * TIMEOUT_S, f"retrieve took {took:.1f} s"
    if got.num_tokens:
        assert torch.equal(got.kv, _kv(i)[:, :, :got.num_tokens]), "wrong KV served"
    return got.num_tokens


def _store(client: KDNClient, i: int) -> None:
    result = client.store(_prompt(i), _kv(i)).result(60)
    assert result.failed == 0 and result.stored == CHUNKS, result


def _store_during_outage(client: KDNClient, i: int) -> None:
    """A store while a lower tier is out: each chunk stored (the memory tier takes it) or failed with a reason,
    within the deadline; whatever is served afterwards is right (checked by ``_fetch``)."""
    started = time.monotonic()
    result = client.store(_prompt(i), _kv(i)).result(60)
    assert time.monotonic() - started < 4 * TIMEOUT_S
    assert result.stored + result.skipped + result.failed == CHUNKS, result
    assert result.failed == 0 or result.error, result
    _fetch(client, i)


def _tiers(control: ControlClient, client: KDNClient, i: int) -> list[set[str]]:
    """The tiers the controller names for each chunk of prompt ``i``."""
    keys = [str(k) for _, k in client.keys(_prompt(i))]
    reply = control.call("Lookup", keys=keys, prefix=False, probe=True)
    return [{loc.tier for loc in r.locations} for r in reply.results]


def _node(cluster: Cluster, name: str, tiers: str, health_port: int, prefix: list[str] | None = None) -> Proc:
    args = ["node", "--port", "0", "--bulk-port", "0", "--metrics-port", "-1", "--controller", cluster.address,
            "--node-id", name, "--data-dir", str(cluster.root / name), "--set", f"node.tiers={tiers}",
            "--set", "node.heartbeat_interval_s=0.3", "--set", "node.shared_memory=false",
            "--set", f"node.health_port={health_port}", *cluster.common]
    node = start_kdn(args, cluster.root / f"{name}.log", cluster.env, prefix=prefix)
    cluster.nodes.append(node)
    return node


def _error_lines(log: Path, needle: str) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if " ERROR " in line and needle in line)


# -- node health ------------------------------------------------------------------------------------------------
def test_node_health_liveness_and_readiness_follow_registration(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_controller()
        port = int(cluster.address.rsplit(":", 1)[1])
        health = f"127.0.0.1:{free_port()}"
        node = _node(cluster, "node-h", "[{kind: memory, capacity: 1MiB}]", int(health.rsplit(":", 1)[1]))
        main = node.ready["node"]
        for address in (main, health):  # the main port (TLS where on) and the plaintext health port
            assert _health(address, "") == "SERVING"
            _until(lambda a=address: _health(a) == "SERVING", 10, "the node to be ready")
        with make_channel(health) as channel, pytest.raises(grpc.RpcError) as err:  # the health service only
            channel.unary_unary("/kdn.v1.Data/Stats")(b"", timeout=2)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        cluster.controller.kill()  # no controller: alive, not ready
        _until(lambda: _health(health) == "NOT_SERVING", 10, "readiness to drop without a controller")
        assert _health(health, "") == "SERVING"
        cluster.start_controller(port=port)
        _until(lambda: _health(health) == "SERVING", 10, "readiness back once registered again")

        node.popen.send_signal(signal.SIGTERM)  # graceful stop: NOT_SERVING (or gone) from the start of shutdown
        node.popen.wait(15)
        assert _health(health, "") in ("", "NOT_SERVING")
    finally:
        cluster.close()


# -- Redis: the node's tier and the controller's lease ------------------------------------------------------------
class _Redis:
    """redis-server with an append-only file fsynced on every write: a kill -9 and restart keeps the objects."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.dir = root / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = self.dir / "server.log"
        self.proc = _spawn(_redis_args(self.port, self.dir, "--appendonly", "yes", "--appendfsync", "always"), log)
        from tests.servers import _ping

        _wait(lambda: _ping(self.port), self.proc, "redis-server", log)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def test_redis_hung_killed_and_back(tmp_path):
    require("redis-server")
    redis = _Redis(tmp_path)
    cluster = Cluster(tmp_path, common=["--set", "placement.policy=hash"])
    try:
        # the controller takes its replica lease on the same Redis as the node's tier (deploy/compose.yaml)
        cluster.controller = start_kdn(["controller", "--port", "0", "--metrics-port", "-1", "--data-dir",
                                        str(tmp_path / "controller"), "--set", f"controller.redis={redis.url}",
                                        "--set", "controller.lease_ttl_s=1.0", *cluster.common],
                                       tmp_path / "controller.log")
        health = f"127.0.0.1:{free_port()}"
        node = _node(cluster, "node-r", f"[{{kind: memory, capacity: {MEMORY}}}, {{kind: redis, url: '{redis.url}', "
                     "socket_timeout_s: 0.5}]", int(health.rsplit(":", 1)[1]))
        _until(lambda: _health(health) == "SERVING", 15, "the node to be ready")
        with _client(cluster.address) as client, contextlib.closing(ControlClient(cluster.address)) as control:
            _until(lambda: client.refresh_nodes(), 10, "the node to register")
            _store(client, 1)
            _store(client, 2)  # evicts most of prompt 1 from memory: those chunks are in Redis only
            assert "memory" not in _tiers(control, client, 1)[0] and "redis" in _tiers(control, client, 1)[0]
            assert _fetch(client, 2) == CHUNKS * CHUNK

            redis.signal(signal.SIGSTOP)  # hung: every Redis call runs into its socket timeout
            try:
                assert _fetch(client, 1) < CHUNKS * CHUNK  # a miss or a correct prefix, within the deadline
                assert _fetch(client, 2) == CHUNKS * CHUNK  # the memory tier still serves
                _store_during_outage(client, 3)
                _until(lambda: _health(health) == "NOT_SERVING", 15, "readiness to drop with Redis hung")
                assert _health(health, "") == "SERVING"
            finally:
                redis.signal(signal.SIGCONT)
            _until(lambda: _health(health) == "SERVING", 20, "readiness back with Redis")
            _until(lambda: _fetch(client, 1) == CHUNKS * CHUNK, 20, "prompt 1 served from Redis again")

            _store(client, 4)  # the hit promoted prompt 1 to memory: push it out again
            _store(client, 5)
            assert "memory" not in _tiers(control, client, 1)[0]
            redis.kill()  # gone: connections refused
            assert _fetch(client, 1) < CHUNKS * CHUNK
            _until(lambda: _health(health) == "NOT_SERVING", 15, "readiness to drop with Redis gone")
            redis.start()  # back on its port with its append-only file
            _until(lambda: _health(health) == "SERVING", 20, "readiness back once Redis restarted")
            _until(lambda: _fetch(client, 1) == CHUNKS * CHUNK, 20, "prompt 1 served from the restarted Redis")
            assert _fetch(client, 5) == CHUNKS * CHUNK
        assert node.popen.poll() is None and cluster.controller.popen.poll() is None
        # one error per outage and operation, not one per request
        assert _error_lines(node.log, "redis tier") <= 12, node.log.read_text()[-3000:]
    finally:
        cluster.close()
        stop(redis.proc)


# -- S3 ---------------------------------------------------------------------------------------------------------
def test_s3_endpoint_hung_and_gone(tmp_path):
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    moto, endpoint = start_moto(tmp_path)
    cluster = Cluster(tmp_path, common=["--set", "placement.policy=hash"])
    try:
        cluster.start_controller()
        health = f"127.0.0.1:{free_port()}"
        s3 = (f"{{kind: s3, bucket: kdn-faults, endpoint_url: '{endpoint}', access_key_id: testing, "
              "secret_access_key: testing, create_bucket: true, connect_timeout_s: 0.5, read_timeout_s: 1.0, "
              "max_attempts: 1}")
        node = _node(cluster, "node-s", f"[{{kind: memory, capacity: {MEMORY}}}, {s3}]", int(health.rsplit(":", 1)[1]))
        _until(lambda: _health(health) == "SERVING", 20, "the node to be ready")
        with _client(cluster.address) as client, contextlib.closing(ControlClient(cluster.address)) as control:
            _until(lambda: client.refresh_nodes(), 10, "the node to register")
            _store(client, 1)
            _store(client, 2)
            assert _tiers(control, client, 1)[0] == {"s3"}

            moto.send_signal(signal.SIGSTOP)  # hung endpoint: requests run into the read timeout
            try:
                assert _fetch(client, 1) < CHUNKS * CHUNK
                assert _fetch(client, 2) == CHUNKS * CHUNK
                _store_during_outage(client, 3)
                _until(lambda: _health(health) == "NOT_SERVING", 15, "readiness to drop with S3 hung")
            finally:
                moto.send_signal(signal.SIGCONT)
            _until(lambda: _health(health) == "SERVING", 20, "readiness back with S3")
            _until(lambda: _fetch(client, 1) == CHUNKS * CHUNK, 20, "prompt 1 served from S3 again")

            _store(client, 4)  # the hit promoted prompt 1 to memory: push it out again
            _store(client, 5)
            assert _tiers(control, client, 1)[0] == {"s3"}
            stop(moto)  # gone for good
            assert _fetch(client, 1) < CHUNKS * CHUNK
            assert _fetch(client, 5) == CHUNKS * CHUNK  # the memory tier serves
            _until(lambda: _health(health) == "NOT_SERVING", 15, "readiness to drop with S3 gone")
        assert node.popen.poll() is None
        assert _error_lines(node.log, "s3 tier") <= 12, node.log.read_text()[-3000:]
    finally:
        cluster.close()
        stop(moto)


# -- disk full --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _small_filesystem(mountpoint: Path, size: str):
    """A tmpfs of ``size`` at ``mountpoint`` in a private mount namespace (an unprivileged user namespace: no root
    needed); yields the command prefix that runs a process inside it."""
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("unshare/nsenter (util-linux) not installed: no small filesystem to fill")
    mountpoint.mkdir(parents=True)
    script = f"mount -t tmpfs -o size={size} kdn-full '{mountpoint}' && echo mounted && exec sleep 100000"
    holder = subprocess.Popen(die_with_parent(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                               script]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = holder.stdout.readline()
        if b"mounted" not in line:
            pytest.skip(f"cannot mount a tmpfs in a user namespace here: {line.decode(errors='replace')}")
        yield ["nsenter", "--target", str(holder.pid), "--user", "--mount", "--preserve-credentials", "--"]
    finally:
        stop(holder)


def test_disk_tier_filesystem_full(tmp_path):
    """ENOSPC: writes fail unacknowledged, readiness drops, the memory tier keeps serving, nothing wrong is ever
    served; after kill -9 and restart every chunk indexed on disk is read back intact; freed space restores
    readiness."""
    mount = tmp_path / "small-disk"
    with _small_filesystem(mount, "192k") as inside:
        cluster = Cluster(tmp_path, common=["--set", "placement.policy=hash"])
        try:
            cluster.start_controller()
            health_port = free_port()
            health = f"127.0.0.1:{health_port}"
            tiers = (f"[{{kind: memory, capacity: {MEMORY}}}, "
                     f"{{kind: disk, capacity: 64MiB, path: '{mount}', fsync: never}}]")
            node = _node(cluster, "node-d", tiers, health_port, prefix=inside)
            _until(lambda: _health(health) == "SERVING", 15, "the node to be ready")
            prompts = 10  # 80 chunks, about 340 KB: more than the filesystem holds
            with _client(cluster.address) as client, contextlib.closing(ControlClient(cluster.address)) as control:
                _until(lambda: client.refresh_nodes(), 10, "the node to register")
                for i in range(prompts):
                    _store(client, i)  # acknowledged: the memory tier took every chunk
                on_disk = {(i, c) for i in range(prompts) for c, t in enumerate(_tiers(control, client, i))
                           if "disk" in t}
                assert 0 < len(on_disk) < prompts * CHUNKS  # the filesystem filled part way
                _until(lambda: _health(health) == "NOT_SERVING", 10, "readiness to drop with the disk full")
                for i in range(prompts):
                    _fetch(client, i)  # correct prefixes or misses only
                assert _fetch(client, 0) == CHUNKS * CHUNK  # the first prompt went to disk whole
                assert _error_lines(node.log, "filesystem full") == 1  # once per episode, not per write

                node.kill()  # kill -9, then the same node on the same filesystem
                cluster.nodes.remove(node)
                node = _node(cluster, "node-d", tiers, health_port, prefix=inside)
                _until(lambda: client.refresh_nodes(), 10, "the node to register again")
                _until(lambda: all("disk" in _tiers(control, client, i)[c] for i, c in on_disk), 15,
                       "every chunk that was on disk indexed again")
                for i in range(prompts):
                    got = _fetch(client, i)
                    whole = sum(1 for c in range(CHUNKS) if (i, c) in on_disk)
                    if whole == CHUNKS:
                        assert got == CHUNKS * CHUNK

                keys = [str(k) for i in range(prompts) for _, k in client.keys(_prompt(i))]
                control.call("Evict", keys=keys)  # frees the filesystem
                _until(lambda: _health(health) == "SERVING", 10, "readiness back once there is room")
            assert node.popen.poll() is None
        finally:
            cluster.close()


# -- controller restart at CI size ------------------------------------------------------------------------------
def test_rebuild_bench_ci_size_never_a_wrong_location(tmp_path):
    """``kdn bench load --rebuild-chunks`` with 3,000 chunks and a 6 s heartbeat: the index is whole again after
    each kill -9 + restart with no wrong location meanwhile, and sooner than the heartbeat interval (the nodes
    notice the lost controller themselves instead of waiting for their next heartbeat)."""
    from kdn.bench import load

    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args(["--rebuild-chunks", "3000", "--rebuild-repeat", "2", "--rebuild-heartbeat", "6",
                              "--work-dir", str(tmp_path)])
    result = load.run(args)
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["indexed_before"] == 3000 and row["unlocated_before"] == 0
        assert row["wrong_locations"] == 0 and row["differ_after"] == 0, row
        assert row["rebuilt_s"] < 6.0, row
    assert os.path.isdir(tmp_path / "this")
