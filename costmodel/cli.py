"""The cost calculator: ``kdnctl cost ...`` or ``python -m costmodel ...``.

Example::

    python -m costmodel --model llama-2-7b --context-tokens 10000 --reuse-per-hour 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from costmodel.catalog import Catalog, Throughput, load_catalog
from costmodel.errors import CostModelError
from costmodel.model import Workload, analyze
from costmodel.report import PLOT_FORMATS, format_table, to_json, write_plot
from costmodel.shapes import MODELS, ModelShape, find_model_by_dims, get_model
from costmodel.timing import Compute

__all__ = ["add_cost_parser", "build_parser", "run", "main"]

_DESCRIPTION = ("Cost of keeping a context's KV cache in each tier versus recomputing it from text "
                "(the model of arXiv 2503.14647; see docs/costmodel.md).")


def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` and enforces ``> minimum`` (strict) or ``>= minimum``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value
    return parse


_pos_int = _number(int, 0, True)
_nonneg_int = _number(int, 0, False)
_pos = _number(float, 0, True)
_nonneg = _number(float, 0, False)


def _params(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"use e.g. 8e9, 8B or 135M, got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    value = float(match.group(1)) * scale
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (a catalog name, or explicit dimensions)")
    m.add_argument("--model", help=f"one of: {', '.join(MODELS)}")
    m.add_argument("--layers", type=_pos_int, help="number of layers")
    m.add_argument("--kv-heads", type=_pos_int, help="number of KV heads")
    m.add_argument("--head-dim", type=_pos_int, help="head dimension")
    m.add_argument("--heads", type=_pos_int, help="query heads (attention FLOPs; default: --kv-heads)")
    m.add_argument("--params", type=_params, help="parameter count for the FLOP estimate, e.g. 8B")
    m.add_argument("--dtype", help="KV dtype: bfloat16 (default), float16, float32, fp8")

    w = p.add_argument_group("workload")
    w.add_argument("--context-tokens", type=_pos_int, help="context length (required)")
    w.add_argument("--prompt-tokens", type=_nonneg_int, default=32, help="new tokens per request (default 32)")
    w.add_argument("--output-tokens", type=_nonneg_int, default=32, help="generated tokens (default 32)")
    w.add_argument("--reuse-per-hour", type=_nonneg, default=1.0,
                   help="requests per hour that use the context (default 1)")
    w.add_argument("--retention-hours", type=_pos, default=1.0, help="how long the KV is kept (default 1)")
    w.add_argument("--compression", type=_pos, default=1.0, help="codec ratio, raw/stored bytes (default 1)")
    w.add_argument("--codec-decode-gbps", type=_pos, help="codec decode speed, GB/s of raw KV (default: free)")
    w.add_argument("--chunk-tokens", type=_pos_int, default=256, help="tokens per stored object (default 256)")
    w.add_argument("--load-stall", type=_nonneg, default=1.0,
                   help="fraction of the load time the GPU waits, 0..1 (default 1; 0 = the paper's model)")
    w.add_argument("--slo-s", type=_pos, help="TTFT target; sizes a provisioned link as GB / SLO")

    g = p.add_argument_group("GPU and prices")
    g.add_argument("--gpu", help="GPU from the catalog (default: the catalog's, h100)")
    g.add_argument("--gpu-price", type=_nonneg, help="override the GPU's $/hour")
    g.add_argument("--prefill-tps", type=_pos, help="measured prefill tokens/s (replaces the FLOP estimate)")
    g.add_argument("--decode-tps", type=_pos, help="measured decode tokens/s for one request")
    g.add_argument("--mfu", type=_pos, default=0.5, help="prefill FLOP utilization for the estimate (default 0.5)")
    g.add_argument("--mbu", type=_pos, default=0.7, help="decode HBM-bandwidth utilization (default 0.7)")
    g.add_argument("--decode-batch", type=_pos_int, default=1, help="requests sharing a decode step (default 1)")
    g.add_argument("--tiers", help="comma-separated tiers to compare (default: gpu,cpu,disk,redis,s3)")
    g.add_argument("--network", help="network profile for remote tiers (default same-zone)")
    g.add_argument("--prices", metavar="YAML", help="your catalog overrides, merged over costmodel/prices.yaml")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.NAME.FIELD=VALUE",
                   help="override one catalog value, e.g. tiers.s3.bandwidth_gbps=1.5 (repeatable)")
    g.add_argument("--list", action="store_true", help="print the catalog (models, GPUs, tiers, networks) and exit")

    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    o.add_argument("--plot", metavar="PATH", help="write cost vs reuse rate as .png or .svg (needs matplotlib)")


def build_parser(prog: str = "python -m costmodel") -> argparse.ArgumentParser:
    """The standalone parser."""
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_cost_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount the calculator as the ``cost`` subcommand; ``args.func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser("cost", help="cost calculator: keep KV in which tier, or recompute?",
                              description=_DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _shape(args: argparse.Namespace) -> ModelShape:
    dims = (args.layers, args.kv_heads, args.head_dim)
    if args.model:
        if any(d is not None for d in dims):
            raise _Usage("give --model or --layers/--kv-heads/--head-dim, not both")
        shape = get_model(args.model)
        return replace(shape, dtype=args.dtype) if args.dtype else shape
    if any(d is None for d in dims):
        raise _Usage("give --model NAME, or all of --layers, --kv-heads and --head-dim")
    name, params, heads = "custom", args.params, args.heads
    twin = find_model_by_dims(*dims)
    if params is None and twin is not None:  # borrow the FLOP-estimate inputs of a catalog model with these dims
        name, params, heads = f"custom (params of {twin.name})", twin.num_params, heads or twin.num_heads
    return ModelShape(name, args.layers, args.kv_heads, args.head_dim, dtype=args.dtype or "bfloat16",
                      num_heads=heads, num_params=params)


class _Usage(CostModelError):
    """Bad command-line combination."""


def _compute(args: argparse.Namespace, catalog: Catalog, shape: ModelShape) -> Compute:
    gpu = catalog.gpu(args.gpu)
    if args.gpu_price is not None:
        gpu = replace(gpu, price_per_hour=args.gpu_price)
    tp = catalog.throughput_for(gpu.name, shape.name)
    if args.prefill_tps or args.decode_tps:
        tp = Throughput(prefill_tokens_per_s=args.prefill_tps or (tp.prefill_tokens_per_s if tp else None),
                        decode_tokens_per_s=args.decode_tps or (tp.decode_tokens_per_s if tp else None),
                        source="command line")
    return Compute(shape, gpu, tp, mfu=args.mfu, mbu=args.mbu, decode_batch=args.decode_batch)


def _list(catalog: Catalog) -> str:
    out = ["models:"]
    out += [f"  {m.name:14} {m.kv_bytes_per_token / 1024:8.1f} KiB/token  layers {m.num_layers}, kv heads "
            f"{m.num_kv_heads}, head dim {m.head_dim}, {m.num_params / 1e9:g}B params" for m in MODELS.values()]
    out.append("gpus:")
    out += [f"  {g.name:8} ${g.price_per_hour:g}/h  {g.peak_tflops:g} TFLOP/s  {g.mem_bandwidth_gbps:g} GB/s  "
            f"[{g.as_of}] {g.source}" for g in catalog.gpus.values()]
    out.append("throughput (tokens/s):")
    out += [f"  {gpu}/{model}: prefill {t.prefill_tokens_per_s}, decode {t.decode_tokens_per_s}  {t.source}"
            for (gpu, model), t in catalog.throughput.items()]
    out.append(f"tiers (priced for {catalog.gpu().name}, network {catalog.network().name}):")
    out += [f"  {t.name:8} ${t.per_gb_hour:.3g}/GB-h  {t.bandwidth_gbps:g} GB/s  get ${t.get_fee:g}  "
            f"egress ${t.egress_per_gb:g}/GB  [{t.as_of}] {t.source}"
            for t in catalog.tier_offers(catalog.gpu(), names=list(catalog.tiers))]
    out.append("networks:")
    out += [f"  {n.name:14} egress ${n.egress_per_gb:g}/GB  link ${n.link_per_hour:g}/h  [{n.as_of}] {n.source}"
            for n in catalog.networks.values()]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Run the calculator for parsed ``args``; 0 on success, 2 on bad input, 1 if an output cannot be written."""
    prog = getattr(args, "prog_name", None) or "cost"
    try:
        catalog = load_catalog(args.prices, args.overrides)
        if args.list:
            print(_list(catalog))
            return 0
        if args.context_tokens is None:
            raise _Usage("--context-tokens is required")
        if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
            raise _Usage(f"--plot: use a .png or .svg file name, got {args.plot!r}")
        shape = _shape(args)
        compute = _compute(args, catalog, shape)
        workload = Workload(
            context_tokens=args.context_tokens, reuse_per_hour=args.reuse_per_hour, prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens, retention_hours=args.retention_hours,
            compression_ratio=args.compression, chunk_tokens=args.chunk_tokens, load_stall=args.load_stall,
            codec_decode_gbps=args.codec_decode_gbps, slo_s=args.slo_s)
        names = [n.strip() for n in args.tiers.split(",") if n.strip()] if args.tiers else None
        tiers = catalog.tier_offers(compute.gpu, catalog.network(args.network), names)
        analysis = analyze(compute, workload, tiers)
    except CostModelError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(analysis))
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(to_json(analysis), indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
        if args.plot:
            write_plot(analysis, tiers, args.plot)
            print(f"wrote {args.plot}")
    except (OSError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m costmodel``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.prog_name = parser.prog
    return args.func(args)
