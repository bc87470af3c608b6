"""The ``kdn`` command: run servers (``serve``, ``controller``, ``node``) and benchmarks (``bench``)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from kdn.config import load_config
from kdn.errors import KDNError

__all__ = ["main", "add_config_flags", "config_from_args"]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML configuration file (default: $KDN_CONFIG)")
    parser.add_argument("--set", metavar="SECTION.FIELD=VALUE", action="append", default=[],
                        help="override any setting, e.g. --set node.tiers='[{kind: memory, capacity: 2GiB}]'")
    parser.add_argument("--data-dir", help="directory for durable tiers (default ~/.local/share/kdn)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 = any free port, -1 = off)")


def config_from_args(args: argparse.Namespace, extra: dict | None = None):
    overrides: dict = {"data_dir": args.data_dir, "log_level": args.log_level, "metrics_port": args.metrics_port}
    overrides.update(extra or {})
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise KDNError(f"--set needs SECTION.FIELD=VALUE, got {item!r}")
        overrides[name.strip()] = value
    return load_config(args.config, overrides=overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_servers(args: argparse.Namespace) -> int:
    from kdn.cli.serve import run_servers

    extra = {}
    if args.command in ("serve", "controller") and args.port is not None:
        extra["controller.port"] = args.port
    if args.command == "serve" and args.node_port is not None:
        extra["node.port"] = args.node_port
    if args.command == "node":
        extra.update({"node.port": args.port, "node.controller": args.controller, "node.node_id": args.node_id})
    if args.command in ("serve", "node") and args.bulk_port is not None:
        extra["node.bulk_port"] = args.bulk_port
    if args.command in ("serve", "node") and args.link_gbps is not None:
        extra["node.link_gbps"] = args.link_gbps
    if args.insecure:
        extra["auth.insecure"] = True
    config = config_from_args(args, extra)
    _setup_logging(config.log_level)
    return run_servers(config, controller=args.command in ("serve", "controller"),
                       node=args.command in ("serve", "node"))


def _cmd_bench(args: argparse.Namespace) -> int:
    result = args.bench_module.run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def build_parser(benches: bool = True) -> argparse.ArgumentParser:
    """The ``kdn`` parser; without ``benches`` the benchmark modules are not imported (they pull in torch, which
    costs a server seconds of start-up, e.g. a controller restarting after a crash)."""
    from kdn.bench import BENCHES

    parser = argparse.ArgumentParser(prog="kdn", description="KDN: a KV-cache delivery network.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="controller + storage node in one process (the embedded default)")
    serve.add_argument("--port", type=int, help="controller port (default 7070)")
    serve.add_argument("--node-port", type=int, help="storage node gRPC port (default 7071)")
    serve.add_argument("--bulk-port", type=int, help="bulk channel port (default 7072, -1 disables)")
    serve.add_argument("--link-gbps", type=float, help="emulate a link of this many Gbit/s on the bulk channel")
    ctl = sub.add_parser("controller", help="the controller alone")
    ctl.add_argument("--port", type=int, help="controller port (default 7070)")
    node = sub.add_parser("node", help="a storage node")
    node.add_argument("--port", type=int, help="gRPC port (default 7071)")
    node.add_argument("--bulk-port", type=int, help="bulk channel port (default 7072, -1 disables)")
    node.add_argument("--link-gbps", type=float, help="emulate a link of this many Gbit/s on the bulk channel")
    node.add_argument("--controller", help="controller address host:port ('' = standalone)")
    node.add_argument("--node-id", help="node name (default <hostname>:<port>)")
    for p in (serve, ctl, node):
        p.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback bind without auth tokens (every caller is admin; warns every minute)")
        add_config_flags(p)
        p.set_defaults(func=_cmd_servers)
    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(sorted(BENCHES)))
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module_name in sorted(BENCHES.items()) if benches else ():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a benchmark whose extras are missing
            bench_sub.add_parser(name, help=f"(unavailable: {exc})")
            continue
        p = bench_sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        p.set_defaults(func=_cmd_bench, bench_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    parser = build_parser(benches=not given or given[0] in ("bench", "-h", "--help"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.error("this benchmark is unavailable here")
    try:
        return args.func(args)
    except KDNError as exc:
        print(f"kdn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
