"""``kdn bench ttft`` runs end to end on the CPU (tiny random Llama, a real child node) and reports every path."""

from __future__ import annotations

import argparse

from kdn.bench import BENCHES, ttft


def test_ttft_bench_smoke(tmp_path, capsys):
    assert BENCHES["ttft"] == "kdn.bench.ttft"
    parser = argparse.ArgumentParser()
    ttft.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--model", "tiny-llama", "--contexts", "96", "--suffix", "8",
                              "--repeats", "1", "--chunk-size", "32", "--paths", "host,node,node-bulk,disk",
                              "--work-dir", str(tmp_path)])
    result = ttft.run(args)
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"full", "ideal", "host", "node", "node-bulk", "disk"}, result["notes"]
    for path in ("host", "node", "node-bulk", "disk"):
        assert rows[path]["hit"] == 88 and rows[path]["same_token"], rows[path]
        assert rows[path]["speedup"] > 0 and rows[path]["of_ideal"] > 0
    assert "ttft_ms" in capsys.readouterr().out
    assert any(n.startswith("node: read in place") for n in result["notes"]), result["notes"]
