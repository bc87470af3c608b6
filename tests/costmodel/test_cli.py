"""The calculator, run as a user would (``python -m costmodel``), and mounted as a subcommand."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from costmodel.cli import add_cost_parser, main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "costmodel", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=60)


def test_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = run_cli("--model", "llama-2-7b", "--context-tokens", "10000", "--reuse-per-hour", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    for needle in ("5.24 GB", "break-even /h", "recommendation", "gpu", "cpu", "disk", "redis", "s3",
                   "Recommendation:"):
        assert needle in proc.stdout
    data = json.loads(out.read_text())
    assert data["kv_bytes"] == 32 * 2 * 32 * 128 * 2 * 10_000
    assert [t["tier"] for t in data["tiers"]] == ["gpu", "cpu", "disk", "redis", "s3"]
    assert data["workload"]["reuse_per_hour"] == 2
    for t in data["tiers"]:
        assert {"hold_per_hour", "cost_per_reuse", "break_even_per_hour", "delay_saved_s", "verdict"} <= set(t)


def test_explicit_dims_paper_setup_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"
    proc = run_cli("--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--dtype", "bfloat16",
                   "--context-tokens", "8192", "--reuse-per-hour", "50", "--compression", "4", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "128.0 KiB/token" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_cli("--model", "llama-7b", "--gpu", "v100", "--gpu-price", "3", "--tiers", "ebs-io2",
                   "--load-stall", "0", "--output-tokens", "1", "--context-tokens", "10000",
                   "--reuse-per-hour", "2", "--plot", str(svg))
    assert proc.returncode == 0, proc.stderr
    assert "BEST" in proc.stdout and "$0.0058/request" in proc.stdout
    assert svg.stat().st_size > 1000 and b"<svg" in svg.read_bytes()[:2000]


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt-9", "--context-tokens", "100"], "unknown model"),
    (["--model", "llama-3-8b", "--context-tokens", "-5"], "must be > 0"),
    (["--model", "llama-3-8b", "--context-tokens", "100", "--reuse-per-hour", "-1"], "must be >= 0"),
    (["--model", "llama-3-8b", "--context-tokens", "100", "--gpu", "tpu9"], "unknown GPU"),
    (["--model", "llama-3-8b"], "--context-tokens is required"),
    (["--layers", "32", "--context-tokens", "100"], "--kv-heads"),
    (["--model", "llama-3-8b", "--context-tokens", "100", "--load-stall", "3"], "load_stall"),
    (["--model", "llama-3-8b", "--context-tokens", "100", "--set", "tiers.s3.bandwidth_gbps=-1"], "bandwidth"),
    (["--model", "llama-3-8b", "--context-tokens", "100", "--plot", "x.gif"], ".png or .svg"),
    (["--layers", "3", "--kv-heads", "1", "--head-dim", "7", "--context-tokens", "100"], "--prefill-tps"),
])
def test_bad_input_exits_2(args: list[str], message: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mounted_as_subcommand(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="kdnctl")
    add_cost_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cost", "--model", "qwen2.5-7b", "--context-tokens", "4000", "--reuse-per-hour", "30",
                              "--prices", str(_cheap_h100(tmp_path))])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b" in out and "$1/h" in out
    assert main(["--list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def _cheap_h100(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text("gpus:\n  h100:\n    price_per_hour: 1.0\n")
    return path
