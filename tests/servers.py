"""Real backend servers for tests: redis-server (single and a 3-node cluster) and moto's S3 server.

Every server binds 127.0.0.1 on a free port, is waited for until it answers, and is started so that it dies with
the test process (``PR_SET_PDEATHSIG``) even if pytest is killed; fixtures stop them on teardown. Fixtures skip
with a clear reason when ``redis-server``/``redis-cli`` are not installed (``apt-get install redis-server
redis-tools``). ``--redis-url`` is not needed: tests own their servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = ["free_port", "start_redis", "start_redis_cluster", "start_moto", "stop", "redis_server",
           "redis_cluster", "moto_server", "require"]

# A trampoline that asks for SIGKILL when its parent dies, then execs the real command (the request survives exec).
# Not ``preexec_fn``: that makes Python fork() instead of vfork(), which runs gRPC's fork handlers in the child; its
# event engine then restarts a poller on a closed epoll fd and aborts the child before exec (grpc/grpc#43055).
_TRAMPOLINE = ("import ctypes, os, sys; ctypes.CDLL('libc.so.6').prctl(1, 9); "
               "os.execvp(sys.argv[1], sys.argv[1:])")


def die_with_parent(args: Sequence[str]) -> list[str]:
    """``args`` wrapped so that the process gets SIGKILL when the test process dies (``PR_SET_PDEATHSIG``)."""
    return [sys.executable, "-c", _TRAMPOLINE, *args]


def _spawn(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(die_with_parent(args), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()


def free_port(*, with_bus: bool = False) -> int:
    """A port free on 127.0.0.1 now (and ``port + 10000`` too when ``with_bus``, for Redis Cluster)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port + 10000))
                return port
    raise RuntimeError("no free port found")


def stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Terminate ``proc`` (then kill it) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _wait(check, proc: subprocess.Popen, what: str, log_path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{what} not ready after {timeout} s: {log_path.read_text(errors='replace')[-2000:]}")


def require(*programs: str) -> None:
    """Skip the test when a program is not installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install redis-server redis-tools)")


def _redis_args(port: int, workdir: Path, *extra: str) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no", *extra]


def _ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(tmp_path: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``redis-server`` (no persistence) on ``port`` or a free one; returns ``(proc, url)``."""
    port = port or free_port()
    workdir = Path(tmp_path) / f"redis-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    proc = _spawn(_redis_args(port, workdir), log_path)
    _wait(lambda: _ping(port), proc, "redis-server", log_path)
    return proc, f"redis://127.0.0.1:{port}/0"


def _cluster_ok(port: int) -> bool:
    out = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True,
                         timeout=5).stdout
    return "cluster_state:ok" in out


def start_redis_cluster(tmp_path: Path, nodes: int = 3) -> tuple[list[subprocess.Popen], str]:
    """Start ``nodes`` cluster-enabled redis-servers, join them with ``redis-cli --cluster create`` (no replicas)
    and wait for ``cluster_state:ok``; returns ``(procs, url of one node)``."""
    procs: list[subprocess.Popen] = []
    ports: list[int] = []
    try:
        for _ in range(nodes):
            port = free_port(with_bus=True)
            workdir = Path(tmp_path) / f"cluster-{port}"
            workdir.mkdir(parents=True, exist_ok=True)
            log_path = workdir / "server.log"
            proc = _spawn(_redis_args(port, workdir, "--cluster-enabled", "yes", "--cluster-config-file",
                                      str(workdir / "nodes.conf"), "--cluster-node-timeout", "2000"), log_path)
            procs.append(proc)
            ports.append(port)
            _wait(lambda p=port: _ping(p), proc, "redis-server (cluster)", log_path)
        create = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                                 "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True,
                                timeout=30)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}{create.stderr[-2000:]}")
        deadline = time.monotonic() + 15
        while not all(_cluster_ok(p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        for proc in procs:
            stop(proc)
        raise
    return procs, f"redis://127.0.0.1:{ports[0]}/0"


def start_moto(tmp_path: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's S3-compatible HTTP server (``python -m moto.server``); returns ``(proc, endpoint_url)``."""
    port = port or free_port()
    log_path = Path(tmp_path) / f"moto-{port}.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log_path, env)
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: urllib.request.urlopen(url + "/moto-api/", timeout=1).status == 200, proc, "moto server", log_path)
    return proc, url


# -- pytest fixtures (import them into a test module to use them) -----------------------------------------------
class Server:
    """A running server: its URL and its process(es)."""

    def __init__(self, url: str, procs: list[subprocess.Popen]) -> None:
        self.url, self.procs = url, procs

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[Server]:
    """One redis-server for the session; tests isolate themselves with a unique key prefix."""
    require("redis-server")
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    server = Server(url, [proc])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[Server]:
    """A 3-node Redis Cluster (no replicas) for the session."""
    require("redis-server", "redis-cli")
    procs, url = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    server = Server(url, procs)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[Server]:
    """One moto S3 server for the session; tests isolate themselves with a unique bucket or key prefix."""
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    proc, url = start_moto(tmp_path_factory.mktemp("moto"))
    server = Server(url, [proc])
    yield server
    server.stop()
