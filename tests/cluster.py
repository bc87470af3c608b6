"""Real KDN processes for tests: a controller and storage nodes started with ``python -m kdn`` on free ports.

Each process prints one JSON ready line on stdout; :class:`Proc` reads it to learn the bound ports.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import die_with_parent, stop

__all__ = ["Proc", "Cluster", "start_kdn"]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    args: list[str]
    log: Path
    popen: subprocess.Popen
    ready: dict

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(5)

    def stop(self) -> None:
        stop(self.popen)


def start_kdn(args: list[str], log: Path, env: dict | None = None, timeout: float = 30.0,
              prefix: list[str] | None = None) -> Proc:
    """Run ``python -m kdn ARGS`` (after ``prefix``, e.g. an ``nsenter`` command) and wait for its ready line."""
    full = [*(prefix or []), sys.executable, "-m", "kdn", *args]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environ.pop("KDN_CONFIG", None)
    err = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        popen = subprocess.Popen(die_with_parent(full), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                 env=environ, cwd=REPO)
    finally:
        err.close()
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"kdn {args[0]} exited {popen.returncode}: {log.read_text(errors='replace')[-3000:]}")
        ready, _, _ = select.select([popen.stdout], [], [], 0.2)
        if ready:
            line += os.read(popen.stdout.fileno(), 4096)
            if b"\n" in line:
                return Proc(full, log, popen, json.loads(line.split(b"\n")[0]))
    popen.kill()
    raise TimeoutError(f"kdn {args[0]} not ready after {timeout}s: {log.read_text(errors='replace')[-3000:]}")


@dataclass
class Cluster:
    """One controller and some nodes, each a real process."""

    root: Path
    controller: Proc | None = None
    nodes: list[Proc] = field(default_factory=list)
    common: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    admin_token: str = ""
    tls: Any = None
    """A :class:`kdn.config.TLSConfig` when the processes serve TLS."""

    @property
    def address(self) -> str:
        return self.controller.ready["controller"]

    def start_controller(self, port: int = 0) -> Proc:
        self.controller = start_kdn(["controller", "--port", str(port), "--metrics-port", "-1",
                                     "--data-dir", str(self.root / "controller"), *self.common],
                                    self.root / "controller.log", self.env)
        return self.controller

    def start_node(self, name: str, tiers: str = "[{kind: memory, capacity: 256MiB}]", port: int = 0,
                   extra: list[str] | None = None) -> Proc:
        node = start_kdn(["node", "--port", str(port), "--bulk-port", "0", "--metrics-port", "-1",
                          "--controller", self.address, "--node-id", name, "--data-dir", str(self.root / name),
                          "--set", f"node.tiers={tiers}", "--set", "node.heartbeat_interval_s=0.3",
                          *self.common, *(extra or [])], self.root / f"{name}.log", self.env)
        self.nodes.append(node)
        return node

    def wait_nodes(self, count: int, timeout: float = 15.0) -> None:
        from kdn.v1 import control_pb2, control_pb2_grpc
        from kdn.wire.auth import call_metadata
        from kdn.wire.rpc import make_channel

        token = self.admin_token
        with make_channel(self.address, self.tls) as channel:
            stub = control_pb2_grpc.ControlStub(channel)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                reply = stub.ListNodes(control_pb2.ListNodesRequest(), timeout=5, metadata=call_metadata(token))
                if sum(n.alive for n in reply.nodes) >= count:
                    return
                time.sleep(0.1)
        raise TimeoutError(f"fewer than {count} nodes registered")

    def close(self) -> None:
        for proc in [*self.nodes, self.controller]:
            if proc is not None:
                proc.stop()
