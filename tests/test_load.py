"""``kdn bench load`` in miniature (CI's short version): concurrent clients of several tenants against a real
controller and two real nodes; no errors, no wrong hits, every server alive, RSS flat over the last half."""

from __future__ import annotations

import argparse

import pytest

from kdn.bench import load

pytestmark = pytest.mark.timeout(240)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_rss_growth_measures_the_last_half():
    assert load.rss_growth([100, 100, 100, 100, 100, 100]) == 0.0
    assert load.rss_growth([100, 100, 100, 100, 130, 130]) == pytest.approx(0.30)
    assert load.rss_growth([1, 2]) == 0.0  # too few samples to judge


def test_load_short_run_has_no_errors_and_no_leak(tmp_path):
    result = load.run(_args("--clients", "8", "--procs", "2", "--duration", "20", "--warmup", "3",
                            "--tenants", "3", "--prompts", "100", "--node-memory", "8MiB", "--sample-s", "0.5",
                            "--work-dir", str(tmp_path)))
    summary = result["summary"]
    assert summary["errors"] == 0, result["errors"]
    assert summary["wrong_hits"] == 0
    ops = {row["op"]: row for row in result["rows"]}
    assert all(ops[op]["ops"] > 0 for op in ("lookup", "fetch", "store")), ops
    assert 0 < summary["lookup_key_hit_rate"] <= 1
    for row in result["rss"]:
        assert row["alive"], row
        assert row["growth_last_half"] <= 0.10, result["rss"]
    assert len(result["rss_samples"]["controller"]) >= 10
