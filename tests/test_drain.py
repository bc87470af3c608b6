"""Draining and removing storage nodes (``kdnctl nodes drain|remove``, docs/operations.md) with real processes.

A drained node takes no new stores, its sole copies get a second holder (the node pushes them to another node's
``Data.Replicate`` with its node token, ordered in heartbeat replies), removal is refused for an undrained alive node
and afterwards lookups never list the node, the removed process is refused until it restarts, only admins may
drain or remove, and the drain state survives a controller restart (data_dir) and a replica failover (Redis).
"""

from __future__ import annotations

import time
from contextlib import closing

import pytest
import torch

from kdn import KDNClient, KVLayout
from kdn.cli.ctl import main as kdnctl
from kdn.client.control import ControlClient
from kdn.errors import InvalidRequest, PermissionDenied
from tests.cluster import Cluster, start_kdn
from tests.servers import require, start_redis, stop

pytestmark = pytest.mark.timeout(240)

LAYOUT = KVLayout(model_id="drain-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
CHUNK = 32
TOKENS = {"admin-secret": "@admin", "node-secret": "@node", "acme-secret": "acme"}
TIERS = "[{kind: memory, capacity: 64MiB}]"


def _prompt(i: int) -> list[int]:
    return list(range(i * 1000, i * 1000 + 2 * CHUNK))


def _kv(i: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(2 * CHUNK), generator=torch.Generator().manual_seed(i)).to(torch.float16)


def _wait(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _client(address: str, token: str = "") -> KDNClient:
    return KDNClient(LAYOUT, controller=address, chunk_size=CHUNK, tenant="acme", token=token, shared_memory=False,
                     store_partial=False, timeout_s=20.0)


def _holders(ctl: ControlClient, keys: list[str]) -> dict[str, list[str]]:
    """key -> node ids of its live locations, in the order lookups list them."""
    reply = ctl.call("Lookup", keys=keys, prefix=False, probe=True)
    return {r.key: [loc.node_id for loc in r.locations] for r in reply.results}


def _node(ctl: ControlClient, node_id: str):
    return next((n for n in ctl.call("ListNodes").nodes if n.node_id == node_id), None)


def _store(client: KDNClient, prompts: range) -> list[str]:
    for i in prompts:
        assert client.store(_prompt(i), _kv(i)).result(60).stored == 2
    return [str(k) for i in prompts for _, k in client.keys(_prompt(i))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokens = "{" + ", ".join(f"'{k}': '{v}'" for k, v in TOKENS.items()) + "}"
    c = Cluster(tmp_path_factory.mktemp("drain"), common=["--set", f"auth.tokens={tokens}"], admin_token="admin-secret")
    c.start_controller()
    for name in ("a", "b"):
        c.start_node(name, tiers=TIERS, extra=["--set", "node.token=node-secret"])
    c.wait_nodes(2)
    yield c
    c.close()


def test_drain_copies_sole_copies_then_remove_hides_the_node(world, capsys):
    c = world
    with closing(ControlClient(c.address, token="admin-secret")) as ctl, _client(c.address, "acme-secret") as client:
        keys = _store(client, range(16))
        _wait(lambda: all(_holders(ctl, keys).values()), "stored chunks listed")
        sole_a = [k for k, h in _holders(ctl, keys).items() if h == ["a"]]
        assert sole_a, "rendezvous placed nothing on node a"

        assert kdnctl(["--controller", c.address, "--token", "admin-secret", "nodes", "drain", "a"]) == 0
        assert "node a" in capsys.readouterr().out
        info = _node(ctl, "a")
        assert info.draining and info.drain_pending <= len(sole_a)
        assert not _node(ctl, "b").draining

        fresh = _store(client, range(100, 108))  # placement skips the draining node
        _wait(lambda: all(_holders(ctl, fresh).values()), "new chunks listed")
        assert all(h == ["b"] for h in _holders(ctl, fresh).values()), _holders(ctl, fresh)

        _wait(lambda: _node(ctl, "a").drain_pending == 0, "node a drained")
        after = _holders(ctl, sole_a)
        assert all(sorted(h) == ["a", "b"] for h in after.values()), after
        assert all(h[0] == "b" for h in after.values())  # the draining node's copies are listed last

        with pytest.raises(InvalidRequest, match="not draining"):
            ctl.call("RemoveNode", node_id="b")
        assert _node(ctl, "b") is not None

        assert kdnctl(["--controller", c.address, "--token", "admin-secret", "--json", "nodes", "remove", "a"]) == 0
        assert '"lost": 0' in capsys.readouterr().out
        # node a's process keeps heartbeating: it is refused, and no lookup lists it for a while
        for _ in range(15):
            assert all("a" not in h for h in _holders(ctl, keys + fresh).values())
            assert _node(ctl, "a") is None
            time.sleep(0.2)
        for i in [*range(16), *range(100, 108)]:
            got = client.retrieve(_prompt(i))
            assert got.num_tokens == 2 * CHUNK and torch.equal(got.kv, _kv(i))
        assert "was removed" in (c.root / "a.log").read_text(errors="replace")

        # restarted (a new epoch), it registers as a fresh node that takes stores again
        old = c.nodes.pop(0)
        old.stop()
        c.start_node("a", tiers=TIERS, extra=["--set", "node.token=node-secret"])
        c.wait_nodes(2)
        info = _node(ctl, "a")
        assert info.alive and not info.draining and info.epoch != 0


def test_drain_and_remove_are_admin_only(world):
    for token in ("acme-secret", "node-secret"):
        with closing(ControlClient(world.address, token=token)) as ctl:
            with pytest.raises(PermissionDenied):
                ctl.call("DrainNode", node_id="b")
            with pytest.raises(PermissionDenied):
                ctl.call("RemoveNode", node_id="b", force=True)
    with closing(ControlClient(world.address, token="admin-secret")) as ctl:
        assert not _node(ctl, "b").draining
        with pytest.raises(InvalidRequest, match="not draining"):
            ctl.call("RemoveNode", node_id="b")


def test_drain_state_survives_a_controller_restart(tmp_path):
    c = Cluster(tmp_path)
    try:
        port = int(c.start_controller().ready["controller"].rsplit(":", 1)[1])
        for name in ("a", "b"):
            c.start_node(name, tiers=TIERS)
        c.wait_nodes(2)
        with closing(ControlClient(c.address)) as ctl:
            assert ctl.call("DrainNode", node_id="a").node.draining
        c.controller.kill()  # kill -9: the state must be on disk already
        c.start_controller(port=port)
        c.wait_nodes(2)
        with closing(ControlClient(c.address)) as ctl, _client(c.address) as client:
            assert _node(ctl, "a").draining and not _node(ctl, "b").draining
            keys = _store(client, range(8))
            _wait(lambda: all(_holders(ctl, keys).values()), "chunks listed")
            assert all(h == ["b"] for h in _holders(ctl, keys).values())
            assert ctl.call("DrainNode", node_id="a", undo=True).node.draining is False
    finally:
        c.close()


def test_drain_state_is_shared_by_controller_replicas(tmp_path):
    require("redis-server")
    redis_proc, url = start_redis(tmp_path)
    procs = []
    try:
        for name in ("ctl-a", "ctl-b"):
            procs.append(start_kdn(["controller", "--port", "0", "--metrics-port", "-1", "--data-dir",
                                    str(tmp_path / name), "--set", f"controller.redis={url}",
                                    "--set", "controller.lease_ttl_s=1.0"], tmp_path / f"{name}.log"))
            time.sleep(0.5 if name == "ctl-a" else 0)  # a takes the lease first
        addresses = ",".join(p.ready["controller"] for p in procs)
        for name in ("n1", "n2"):
            procs.append(start_kdn(["node", "--port", "0", "--bulk-port", "0", "--metrics-port", "-1",
                                    "--controller", addresses, "--node-id", name, "--data-dir", str(tmp_path / name),
                                    "--set", f"node.tiers={TIERS}", "--set", "node.heartbeat_interval_s=0.3"],
                                   tmp_path / f"{name}.log"))
        with closing(ControlClient(addresses, timeout_s=5)) as ctl:
            _wait(lambda: sum(n.alive for n in ctl.call("ListNodes").nodes) == 2, "nodes registered")
            assert ctl.call("DrainNode", node_id="n1").node.draining
            active = ctl.current
            next(p for p in procs if p.ready.get("controller") == active).kill()
            _wait(lambda: _try_nodes(ctl) == {"n1": True, "n2": False}, "the other replica to serve both nodes")
            assert ctl.current != active
    finally:
        for proc in reversed(procs):
            proc.stop()
        stop(redis_proc)


def _try_nodes(ctl: ControlClient) -> dict[str, bool] | None:
    """node id -> draining, from whichever replica serves (None while none does)."""
    try:
        return {n.node_id: n.draining for n in ctl.call("ListNodes").nodes if n.alive}
    except Exception:  # noqa: BLE001 - no replica serving yet
        return None
