"""Shared memory does not cross tenants: two real client processes of two tenants against one real node process
with tokens. The second tenant's process can neither map nor read the first's bytes — not through the client API,
the protocol by hand, the node's ``/proc`` descriptors, nor any offset of the arenas it holds — also not after it
takes the first tenant's freed space over; and over-bounded lease requests close the connection unserved."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest

from tests.cluster import REPO, Cluster, Proc
from tests.servers import die_with_parent

TOKENS = {"admin-secret": "@admin", "acme-secret": "acme", "globex-secret": "globex"}
VICTIM_MARKER, ATTACKER_MARKER = "ACME-SECRET-KV!!", "globex-own-kv-##"


class Child:
    """A tenant's client process (tests/shm_tenant_proc.py) speaking JSON lines."""

    def __init__(self, role: str, args: dict, log) -> None:
        cmd = die_with_parent([sys.executable, "-m", "tests.shm_tenant_proc", role, json.dumps(args)])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                                      env=env)

    def read(self, timeout: float = 120.0) -> dict:
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if ready else b""
        if not line:
            self.popen.kill()
            raise AssertionError(f"tenant process ended or stalled (rc {self.popen.poll()}); see its log")
        return json.loads(line)

    def go(self) -> None:
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.flush()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


def start_node(c: Cluster, name: str, extra: list[str]) -> Proc:
    """``kdn node`` as Cluster.start_node runs it, but through tests.shm_tenant_proc (no capabilities)."""
    args = ["--port", "0", "--bulk-port", "0", "--metrics-port", "-1", "--controller", c.address, "--node-id", name,
            "--data-dir", str(c.root / name), "--set", "node.heartbeat_interval_s=0.3", *c.common, *extra]
    cmd = die_with_parent([sys.executable, "-m", "tests.shm_tenant_proc", "node", *args])
    log = c.root / f"{name}.log"
    with open(log, "ab") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    ready, _, _ = select.select([popen.stdout], [], [], 60)
    line = popen.stdout.readline() if ready else b""
    if not line:
        popen.kill()
        raise RuntimeError(f"node not ready: {log.read_text(errors='replace')[-3000:]}")
    proc = Proc(cmd, log, popen, json.loads(line))
    c.nodes.append(proc)
    return proc


@pytest.fixture
def node_with_tokens(tmp_path):
    yaml_tokens = "{" + ", ".join(f"{k}: '{v}'" for k, v in TOKENS.items()) + "}"
    c = Cluster(tmp_path, common=["--set", f"auth.tokens={yaml_tokens}"], admin_token="admin-secret")
    try:
        c.start_controller()
        start_node(c, "node-a", ["--set", "node.tiers=[{kind: memory, capacity: 1MiB}]",
                                 "--set", "node.token=admin-secret"])
        c.wait_nodes(1)
        yield c
    finally:
        c.close()


def overlaps(a: list, b: list) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def test_second_tenant_can_neither_map_nor_read_the_first_tenants_bytes(node_with_tokens, tmp_path):
    c = node_with_tokens
    log = open(tmp_path / "tenants.log", "ab")  # noqa: SIM115
    victim = attacker = None
    try:
        victim = Child("victim", {"controller": c.address, "tenant": "acme", "token": "acme-secret",
                                  "marker": VICTIM_MARKER, "tokens": 8 * 64}, log)
        stored = victim.read()
        assert stored["shared"] and stored["hit"] == 8 * 64 and stored["in_arena"], \
            "the victim reads its own objects in place from its arena (so there is something to steal)"
        attacker = Child("attacker", {"controller": c.address, "node": c.nodes[0].ready["node"],
                                      "tenant": "globex", "token": "globex-secret", "victim_tenant": "acme",
                                      "victim_keys": stored["keys"], "victim_marker": VICTIM_MARKER,
                                      "marker": ATTACKER_MARKER, "tokens": 8 * 64, "fill_rounds": 4}, log)
        probed = attacker.read()
        assert probed["own_shared"] and probed["own_bytes_in"], "the attacker's own reads do use shared memory"
        assert probed["asked"] == {"globex": 0, "acme": 0}, "the victim's keys are misses for a globex token"
        raw = probed["raw"]
        assert raw["status"] == 0 and raw["hits"] == 0 and raw["hits_again"] == 0
        assert raw["fds"] == 1, "a connection receives exactly one arena: its own tenant's"
        assert probed["node_fd_access"].startswith("opened 0 of"), "the node's arenas are out of reach through /proc"
        assert len(probed["memfds"]) == 1, f"the attacker holds one arena: {probed['memfds']}"
        assert probed["victim_bytes_in"] == [], "the victim's bytes are readable in the attacker's mappings"
        assert probed["oversized"] == ["closed"] * 5
        victim.go()
        assert victim.read()["step"] == "done"  # the victim still reads its KV intact, then releases and exits
        victim.popen.wait(30)
        attacker.go()
        filled = attacker.read()
        assert overlaps(filled["ranges"], stored["ranges"]), \
            "the attacker's objects took over the victim's freed offsets (else this step proves nothing)"
        assert filled["victim_bytes_in"] == [], "freed victim bytes readable by the next tenant"
        assert len(filled["memfds"]) == 1
    finally:
        for child in (victim, attacker):
            if child is not None:
                child.close()
        log.close()
