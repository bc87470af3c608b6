"""The commands as a user runs them: `kdn serve` (embedded default) and `kdnctl` against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import torch

from kdn.client import KDNClient
from tests.cluster import REPO, start_kdn


def kdnctl(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdn.cli.ctl", "--controller", address, *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def served(tmp_path):
    proc = start_kdn(["serve", "--port", "0", "--node-port", "0", "--bulk-port", "0", "--metrics-port", "0",
                      "--data-dir", str(tmp_path / "data")], tmp_path / "serve.log")
    yield proc
    proc.stop()


def test_serve_defaults_memory_and_disk_tiers_and_metrics(served, layout, tmp_path):
    ready = served.ready
    assert ready["controller"] and ready["node"] and ready["bulk"]
    tokens = list(range(300))
    kv = torch.randn(layout.shape(len(tokens))).to(torch.bfloat16)
    with KDNClient(layout, controller=ready["controller"], chunk_size=64) as client:
        assert client.store(tokens, kv).result(30).stored == 5
        assert torch.equal(client.retrieve(tokens).kv, kv)
    assert len(list((tmp_path / "data" / "disk").rglob("*.kdn"))) == 5  # write-through to the disk tier
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics']}/metrics", timeout=10).read().decode()
    assert "kdn_node_objects_total" in metrics and "kdn_controller_lookups_total" in metrics

    nodes = json.loads(kdnctl(ready["controller"], "--json", "nodes").stdout)
    assert len(nodes) == 1 and nodes[0]["alive"]
    assert [t["kind"] for t in nodes[0]["tiers"]] == ["memory", "disk"]
    listed = json.loads(kdnctl(ready["controller"], "--json", "ls", "default/").stdout)
    keys = [k["key"] for k in listed["keys"]]
    assert len(keys) == 5 and all(k.startswith("default/") for k in keys)
    human = kdnctl(ready["controller"], "ls")
    assert human.returncode == 0 and keys[0] in human.stdout
    info = json.loads(kdnctl(ready["controller"], "--json", "inspect", keys[0]).stdout)
    assert info["verified"] and info["codec"] == "raw" and info["layers"] == layout.num_layers
    stats = json.loads(kdnctl(ready["controller"], "--json", "stats").stdout)
    assert stats["controller"]["keys"] == "5" or stats["controller"]["keys"] == 5
    assert stats["nodes"][0]["puts"] >= 5
    assert kdnctl(ready["controller"], "pin", keys[0]).returncode == 0
    evicted = json.loads(kdnctl(ready["controller"], "--json", "evict", "--prefix", "default/").stdout)
    assert evicted["evicted"] == 5
    with KDNClient(layout, controller=ready["controller"], chunk_size=64) as client:
        assert client.lookup(tokens).hit_tokens == 0
    missing = kdnctl(ready["controller"], "inspect", keys[0])
    assert missing.returncode == 1 and "not found" in missing.stdout


def test_status_and_errors_are_readable(served):
    status = kdnctl(served.ready["controller"], "status")
    assert status.returncode == 0 and "1 alive" in status.stdout
    down = kdnctl("127.0.0.1:1", "--timeout", "2", "status")
    assert down.returncode == 2 and "kdnctl: error" in down.stderr and "Traceback" not in down.stderr


def test_graceful_shutdown_on_sigterm(served):
    served.popen.send_signal(signal.SIGTERM)
    assert served.popen.wait(15) == 0


def test_bad_config_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdn", "serve", "--set", "node.tiers=[{kind: tape}]"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "unknown tier kind" in proc.stderr and "Traceback" not in proc.stderr


def test_busy_port_is_a_clear_error(served):
    port = served.ready["controller"].rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "kdn", "controller", "--port", port, "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "cannot bind" in proc.stderr and "Traceback" not in proc.stderr


def test_kdnctl_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "kdn.cli.ctl", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("status", "nodes", "ls", "inspect", "evict", "pin", "unpin", "stats", "cost", "codec", "warm"):
        assert command in out, command


def test_missing_extra_is_a_one_line_hint(tmp_path):
    """``kdnctl warm`` without the [hf] extra (transformers hidden) says which extra to install."""
    (tmp_path / "doc.txt").write_text("some text")
    code = ("import sys; sys.modules['transformers'] = None; from kdn.cli.ctl import main; "
            f"sys.exit(main(['warm', {str(tmp_path)!r}, '--model', 'none']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[hf]" in lines[0] and "pip install" in lines[0], proc.stderr
