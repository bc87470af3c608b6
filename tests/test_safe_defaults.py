"""Safe defaults with real processes: open mode only on loopback, ``--insecure`` to override (with a repeated
warning), secrets from files and never logged, ``kdnctl gen-secrets`` files that a TLS + token cluster runs on,
and no log flood from malformed gRPC messages sent before authentication."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import grpc
import pytest
import torch

from kdn.cli.serve import InsecureWarning
from kdn.client import KDNClient
from kdn.config import TLSConfig, load_config
from kdn.errors import AuthError
from kdn.format.layout import KVLayout
from kdn.wire.auth import is_loopback
from kdn.wire.grpc_log import MalformedMessageFilter
from tests.cluster import REPO, Cluster, start_kdn

CHUNK = 16
LAYOUT = KVLayout("kdn-test/safe", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")
PORTS = ["--port", "0", "--node-port", "0", "--bulk-port", "0", "--metrics-port", "-1"]
ANY = ["--set", "controller.host=0.0.0.0", "--set", "node.host=0.0.0.0"]


def _kdn(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KDN_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "kdn", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO, stdin=subprocess.DEVNULL)


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.5")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.1.2.3", "192.168.0.1"))


def test_open_mode_on_any_address_refuses_to_start(tmp_path):
    result = _kdn(["serve", *PORTS, *ANY, "--data-dir", str(tmp_path)])
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without auth tokens" in result.stderr and "--insecure" in result.stderr
    assert '"ready"' not in result.stdout
    result = _kdn(["node", "--port", "0", "--bulk-port", "0", "--metrics-port", "-1", "--controller", "",
                   "--set", "node.host=0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.returncode == 2 and "refusing" in result.stderr


def test_insecure_flag_starts_and_warns(tmp_path):
    proc = start_kdn(["serve", "--insecure", *PORTS, *ANY, "--data-dir", str(tmp_path)], tmp_path / "serve.log")
    try:
        assert proc.ready["event"] == "ready"
    finally:
        proc.stop()
    assert "INSECURE: serving without auth tokens" in (tmp_path / "serve.log").read_text()


def test_loopback_open_mode_starts_without_warning(tmp_path):
    proc = start_kdn(["serve", *PORTS, "--data-dir", str(tmp_path)], tmp_path / "serve.log")
    proc.stop()
    assert "INSECURE" not in (tmp_path / "serve.log").read_text()


def test_insecure_warning_repeats_every_minute(caplog):
    now = [0.0]
    warning = InsecureWarning(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kdn.cli.serve"):
        ticks = []
        for t in (0, 1, 59, 60, 100, 121):
            now[0] = t
            ticks.append(warning.tick())
    assert ticks == [True, False, False, True, False, True]
    assert sum("INSECURE" in r.getMessage() for r in caplog.records) == 3


def test_secret_files_load_and_never_appear_in_logs_or_repr(tmp_path):
    (tmp_path / "tokens.yaml").write_text("'s3cr3t-admin-token': '@admin'\n's3cr3t-node-token': '@node'\n")
    (tmp_path / "node.token").write_text("s3cr3t-node-token\n")
    config = load_config(overrides={"auth.tokens_file": str(tmp_path / "tokens.yaml"),
                                    "node.token_file": str(tmp_path / "node.token")}, environ={})
    assert config.node.token == "s3cr3t-node-token" and config.auth.tokens["s3cr3t-admin-token"] == "@admin"
    assert "s3cr3t" not in repr(config)
    proc = start_kdn(["serve", *PORTS, "--data-dir", str(tmp_path / "d"), "--log-level", "DEBUG",
                      "--set", f"auth.tokens_file={tmp_path / 'tokens.yaml'}",
                      "--set", f"node.token_file={tmp_path / 'node.token'}"], tmp_path / "serve.log")
    try:
        with KDNClient(LAYOUT, controller=proc.ready["controller"], chunk_size=CHUNK, token="wrong") as bad:
            with pytest.raises(AuthError):
                bad.lookup(list(range(CHUNK)))
    finally:
        proc.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "registered" in log and "s3cr3t" not in log and "s3cr3t" not in proc.ready.__repr__()
    missing = _kdn(["serve", *PORTS, "--data-dir", str(tmp_path), "--set", "node.token_file=/nonexistent/t"])
    assert missing.returncode == 2 and "node.token_file" in missing.stderr


def test_gen_secrets_files_run_a_tls_token_cluster(tmp_path):
    pytest.importorskip("cryptography")
    from kdn.cli.ctl import main as kdnctl

    out = tmp_path / "secrets"
    assert kdnctl(["gen-secrets", str(out), "--tenants", "acme", "--nodes", "node-1",
                   "--hosts", "localhost,127.0.0.1"]) == 0
    for name in ("admin.token", "node-1.token", "tenant-acme.token", "tokens.yaml", "ca.key", "kdn.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    tokens = (out / "tokens.yaml").read_text()
    for name in ("admin", "node-1", "tenant-acme"):
        assert (out / f"{name}.token").read_text().strip() not in tokens  # the map holds digests only
    assert kdnctl(["gen-secrets", str(out)]) == 2  # never overwrites
    tls = TLSConfig(cert=str(out / "kdn.crt"), key=str(out / "kdn.key"), ca=str(out / "ca.crt"), client_auth=True)
    common = ["--set", f"auth.tokens_file={out / 'tokens.yaml'}", "--set", f"tls.cert={tls.cert}",
              "--set", f"tls.key={tls.key}", "--set", f"tls.ca={tls.ca}", "--set", "tls.client_auth=true"]
    admin = (out / "admin.token").read_text().strip()
    c = Cluster(tmp_path, common=common, admin_token=admin, tls=tls)
    try:
        c.start_controller()
        c.start_node("node-1", extra=["--set", f"node.token_file={out / 'node-1.token'}"])
        c.wait_nodes(1)
        prompt = list(range(2 * CHUNK))
        kv = torch.randn(LAYOUT.shape(len(prompt))).to(torch.bfloat16)
        acme_token = (out / "tenant-acme.token").read_text().strip()
        with KDNClient(LAYOUT, controller=c.address, chunk_size=CHUNK, tenant="acme", token=acme_token,
                       tls=tls) as acme:
            assert acme.store(prompt, kv).result(30).stored == 2
            assert torch.equal(acme.retrieve(prompt).kv, kv)
    finally:
        c.close()


def test_malformed_grpc_messages_do_not_flood_the_log(tmp_path):
    proc = start_kdn(["serve", *PORTS, "--data-dir", str(tmp_path)], tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(proc.ready["node"]) as channel:
            call = channel.unary_unary("/kdn.v1.Data/Contains")
            for _ in range(200):
                with pytest.raises(grpc.RpcError) as err:
                    call(b"\xff\xff\xff\xff", timeout=5)
                assert err.value.code() == grpc.StatusCode.INTERNAL
    finally:
        proc.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log
    assert log.count("malformed gRPC message") == 1


def test_malformed_message_filter_summarises_once_per_interval():
    now = [0.0]
    f = MalformedMessageFilter(interval_s=60, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        try:
            raise ValueError("bad wire")
        except ValueError:
            return logging.LogRecord("grpc._common", logging.ERROR, __file__, 1, "Exception deserializing message!",
                                     None, sys.exc_info())

    kept = []
    for t in (0, 1, 2, 61):
        now[0] = t
        r = record()
        if f.filter(r):
            kept.append(r)
    assert len(kept) == 2 and f.total == 4
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in kept)
    assert "refused 3 malformed" in kept[1].getMessage()
    other = logging.LogRecord("grpc._server", logging.ERROR, __file__, 1, "something else", None, None)
    assert f.filter(other)
