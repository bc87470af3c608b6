"""Render an :class:`~costmodel.model.Analysis` as a text table, a JSON-ready dict, or a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from costmodel.catalog import TierOffer
from costmodel.errors import InvalidInput
from costmodel.model import Analysis, at_rate, break_even_reuse_per_hour, delay_saved_seconds, kv_cost, text_cost

__all__ = ["format_table", "to_json", "write_plot", "PLOT_FORMATS"]

PLOT_FORMATS = (".png", ".svg")


def _usd(x: float) -> str:
    if math.isinf(x):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-3 else f"{x:.4f}" if abs(x) < 10 else f"{x:,.2f}"


def _rate(x: float) -> str:
    return "never" if math.isinf(x) else f"{x:.3g}"


def format_table(a: Analysis) -> str:
    """The calculator's human-readable report."""
    m, w, c = a.compute.model, a.workload, a.compute
    lines = [
        f"KV cache   {m.name}: {w.context_tokens:,} tokens x {m.kv_bytes_per_token / 1024:,.1f} KiB/token "
        f"({m.dtype}) = {a.kv_bytes / 1e9:.3g} GB; stored {a.stored_bytes / 1e9:.3g} GB "
        f"(compression {w.compression_ratio:g}x, {w.objects} objects of {w.chunk_tokens} tokens)",
        f"GPU        {c.gpu.name} at ${c.gpu.price_per_hour:g}/h: prefill {a.prefill_s:.3g} s ({c.prefill_method}), "
        f"decode {w.output_tokens} tokens {a.decode_s:.3g} s ({c.decode_method})",
        f"Workload   {w.reuse_per_hour:g} requests/h for {w.retention_hours:g} h, prompt {w.prompt_tokens} + "
        f"output {w.output_tokens} tokens; recompute costs ${_usd(a.recompute_per_request)}/request, "
        f"text-only ${_usd(a.text_cost_per_hour)}/h",
        "",
    ]
    header = ("tier", "load s", "delay saved s", "keep $/h", "$/reuse", "break-even /h", "net $/h", "recommendation")
    rows = [header]
    for t in a.tiers:
        rec = "BEST" if t.tier == a.best else t.verdict
        rows.append((t.tier, f"{t.load_s:.3g}", f"{t.delay_saved_s:.3g}", _usd(t.hold_per_hour),
                     _usd(t.cost_per_reuse), _rate(t.break_even_per_hour), _usd(t.net_saving_per_hour), rec))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j in (0, 7) else cell.rjust(widths[j])
                               for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    lines.append("")
    if a.best is not None:
        best = next(t for t in a.tiers if t.tier == a.best)
        lines.append(f"Recommendation: keep the KV in {best.tier}: saves ${_usd(best.net_saving_per_hour)}/h "
                     f"(C_text/C_kv = {best.ratio:.3g}), {best.delay_saved_s:.3g} s faster per reuse.")
    else:
        finite = [t for t in a.tiers if not math.isinf(t.break_even_per_hour)]
        hint = (f"; cheapest break-even: {min(finite, key=lambda t: t.break_even_per_hour).tier} at "
                f"{_rate(min(t.break_even_per_hour for t in finite))}/h") if finite else \
            "; no tier loads faster than recomputing (try --compression)"
        lines.append(f"Recommendation: recompute from text at {w.reuse_per_hour:g} requests/h{hint}.")
    lines.append(f"$/reuse = fetch fees + GPU stall during the load + keep $/h / rate; "
                 f"paper ratio (no storage) = {a.paper_ratio:.3g}.")
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(a: Analysis) -> dict[str, Any]:
    """All inputs and numbers; infinities (never pays) become ``null``."""
    w, c = a.workload, a.compute
    return {
        "model": {"name": c.model.name, "num_layers": c.model.num_layers, "num_kv_heads": c.model.num_kv_heads,
                  "head_dim": c.model.head_dim, "dtype": c.model.dtype,
                  "kv_bytes_per_token": c.model.kv_bytes_per_token},
        "gpu": {"name": c.gpu.name, "price_per_hour": c.gpu.price_per_hour, "prefill_method": c.prefill_method,
                "decode_method": c.decode_method},
        "workload": {k: _clean(v) for k, v in w.__dict__.items()} | {"requests": w.requests, "objects": w.objects},
        "kv_bytes": a.kv_bytes,
        "stored_bytes": a.stored_bytes,
        "prefill_seconds": a.prefill_s,
        "decode_seconds": a.decode_s,
        "recompute_cost_per_request": a.recompute_per_request,
        "text_cost_per_hour": a.text_cost_per_hour,
        "paper_ratio": _clean(a.paper_ratio),
        "tiers": [{k: _clean(v) for k, v in t.__dict__.items()} for t in a.tiers],
        "recommendation": a.best,
    }


def write_plot(a: Analysis, tiers: list[TierOffer], path: str | Path) -> None:
    """Cost per hour against reuse rate: text-only and one line per tier, break-even points marked.

    PNG or SVG by the file's extension. Needs matplotlib (``pip install 'kdn[plot]'``).
    """
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise InvalidInput(f"--plot: use a .png or .svg file name, got {path.name!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'kdn[plot]' (or pip install matplotlib)") from exc

    c, w = a.compute, a.workload
    marks = [t.break_even_per_hour for t in a.tiers if math.isfinite(t.break_even_per_hour)]
    marks.append(w.reuse_per_hour or 1.0)
    lo, hi = max(min(marks) / 10, 1e-3), max(marks) * 10
    rates = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(rates, [text_cost(c, at_rate(w, r)) / w.retention_hours for r in rates], "k-", lw=2,
            label="recompute from text")
    for tier in tiers:
        slow = delay_saved_seconds(c, w, tier) <= 0
        line = ax.plot(rates, [kv_cost(c, at_rate(w, r), tier) / w.retention_hours for r in rates],
                       ls="--" if slow else "-",
                       label=f"keep KV in {tier.name}" + (" (loads slower than recompute)" if slow else ""))[0]
        be = break_even_reuse_per_hour(c, w, tier)
        if math.isfinite(be) and lo <= be <= hi:
            ax.plot([be], [text_cost(c, at_rate(w, be)) / w.retention_hours], "o", color=line.get_color())
            ax.annotate(f"{be:.3g}/h", (be, text_cost(c, at_rate(w, be)) / w.retention_hours),
                        textcoords="offset points", xytext=(4, -12), fontsize=8, color=line.get_color())
    if w.reuse_per_hour > 0:
        ax.axvline(w.reuse_per_hour, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests per hour using the context")
    ax.set_ylabel("cost, $ per hour")
    ax.set_title(f"{c.model.name}, {w.context_tokens:,}-token context on {c.gpu.name} "
                 f"(retention {w.retention_hours:g} h); dots: break-even")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
