"""Benchmarks run with ``kdn bench <name>``. Each module has ``add_arguments(parser)`` and ``run(args) -> dict``
returning ``{"rows": [...], ...}`` where every row compares against a baseline measured in the same run."""

from __future__ import annotations

BENCHES: dict[str, str] = {
    "transfer": "kdn.bench.transfer",
    "ttft": "kdn.bench.ttft",
    "placement": "kdn.bench.placement",
    "tiers": "kdn.bench.tiers",
    "connectors": "kdn.bench.connectors",
    "codec": "kdn.bench.codec",
    "blend": "kdn.bench.blend",
    "rag": "kdn.bench.rag",
    "schedule": "kdn.bench.schedule",
    "stream": "kdn.bench.stream",
    "mac": "kdn.bench.mac",
    "fuzz": "kdn.bench.fuzz",
    "load": "kdn.bench.load",
    "prefill-only": "kdn.bench.prefill_only",
    "hybrid": "kdn.bench.hybrid",
}


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts) with the given column order."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    table = [[str(c) for c in columns]] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
