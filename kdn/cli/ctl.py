"""``kdnctl``: the admin CLI. Human-readable tables by default, ``--json`` for scripts.

Commands: status, nodes [drain NODE [--undo] | remove NODE [--force]], ls [PREFIX], inspect KEY,
verify KEY... | --prefix P, evict KEY... | --prefix P,
pin KEY..., unpin KEY..., stats, cost (the cost-model calculator), codec profile (build a model profile), warm
(store a corpus as content-keyed chunks for CacheBlend), gen-secrets, derive-key (docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from codec.errors import CodecError
from costmodel.cli import add_cost_parser
from costmodel.errors import CostModelError
from kdn.bench import format_table
from kdn.cli.codec import add_codec_parser
from kdn.cli.extras import missing_extra
from kdn.cli.secrets import add_secrets_parser
from kdn.cli.warm import add_warm_parser
from kdn.client.control import ControlClient
from kdn.errors import CorruptObject, KDNError

__all__ = ["main"]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        from kdn.config import load_config

        config = load_config(args.config)
        self.config = config
        self.address = args.controller or config.client.controller
        self.token = args.token if args.token is not None else config.client.token
        self.tenant = args.tenant or config.client.tenant
        self.timeout = args.timeout
        self.control = ControlClient(self.address, tls=config.tls, token=self.token, tenant=self.tenant,
                                     timeout_s=self.timeout)

    def call(self, method: str, **fields):
        return self.control.call(method, **fields)

    def node_client(self, address: str):
        from kdn.client.transport import NodeClient

        return NodeClient(address, tenant=self.tenant, token=self.token, timeout_s=self.timeout, transport="grpc")


def _emit(args, data, rows: list[dict] | None = None, columns: list[str] | None = None, title: str = "") -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return
    if title:
        print(title)
    if rows is not None:
        print(format_table(rows, columns))


def cmd_status(ctl: Ctl, args) -> int:
    stats = MessageToDict(ctl.call("Stats"),
                          always_print_fields_with_no_presence=True)
    nodes = ctl.call("ListNodes").nodes
    data = {"controller": ctl.address, **stats, "nodes": [MessageToDict(n) for n in nodes]}
    rows = [{"field": k, "value": v} for k, v in stats.items()]
    _emit(args, data, rows, ["field", "value"], title=f"controller {ctl.address}: {len(nodes)} node(s), "
          f"{sum(n.alive for n in nodes)} alive")
    return 0


def cmd_nodes(ctl: Ctl, args) -> int:
    nodes = ctl.call("ListNodes").nodes
    rows = []
    for n in nodes:
        state = "yes" if n.alive else "NO"
        if n.draining:
            state += f", draining ({n.drain_pending} pending)" if n.drain_pending else ", drained"
        rows.append({"node": n.node_id, "address": n.address, "bulk": n.bulk_address or "-",
                     "alive": state, "heartbeat_age_s": round(n.heartbeat_age_s, 1),
                     "objects": n.objects,
                     "tiers": ", ".join(f"{t.kind} {_gib(t.used_bytes)}/{_gib(t.capacity_bytes)}" for t in n.tiers)})
    _emit(args, [MessageToDict(n) for n in nodes], rows)
    return 0


def cmd_drain(ctl: Ctl, args) -> int:
    """Start (``--undo``: end) draining a node; with ``--wait``, poll until nothing is pending."""
    import time

    node = ctl.call("DrainNode", node_id=args.node, undo=args.undo).node
    deadline = time.monotonic() + args.wait
    while not args.undo and node.drain_pending and time.monotonic() < deadline:
        time.sleep(1.0)
        node = next((n for n in ctl.call("ListNodes").nodes if n.node_id == args.node), node)
    if args.undo:
        title = f"node {node.node_id} takes new objects again"
    elif node.drain_pending:
        title = (f"node {node.node_id} draining: {node.drain_pending} object(s) still have no copy elsewhere "
                 f"(kdnctl nodes shows progress)")
    else:
        title = f"node {node.node_id} drained: every object has a copy elsewhere (kdnctl nodes remove {node.node_id})"
    _emit(args, MessageToDict(node, always_print_fields_with_no_presence=True), title=title)
    return 0 if args.undo or not node.drain_pending or not args.wait else 1


def cmd_remove(ctl: Ctl, args) -> int:
    reply = ctl.call("RemoveNode", node_id=args.node, force=args.force)
    title = f"node {args.node} removed: {reply.locations} location(s) dropped"
    if reply.lost:
        title += f", {reply.lost} key(s) had no other copy"
    _emit(args, {"node": args.node, "locations": reply.locations, "lost": reply.lost}, title=title)
    return 0


def cmd_ls(ctl: Ctl, args) -> int:
    prefix = args.prefix or ""
    reply = ctl.call("ListKeys", prefix=prefix, limit=args.limit)
    rows = [{"key": k.key, "size": k.size, "nodes": ",".join(f"{loc.node_id}/{loc.tier}" for loc in k.locations),
             "pinned": "yes" if k.pinned else "", "lookups": k.lookups} for k in reply.keys]
    _emit(args, {"keys": [MessageToDict(k) for k in reply.keys], "truncated": reply.truncated}, rows,
          ["key", "size", "nodes", "pinned", "lookups"])
    if reply.truncated and not args.json:
        print(f"(truncated at {args.limit}; use --limit)")
    return 0


def _explain(ctl: Ctl, key: str) -> dict | None:
    """The controller's placement numbers for ``key`` (None from a controller without ``Explain``)."""
    try:
        reply = ctl.call("Explain", keys=[key])
    except KDNError as exc:
        cause = exc.__cause__
        if isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None  # an older controller
        raise
    if not reply.keys or not reply.keys[0].found:
        return None
    return MessageToDict(reply.keys[0], preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_placement(p: dict) -> None:
    rate = p.get("reuse_per_hour", 0.0)
    print(f"\nplacement ({p['policy']}): {p['action']} - {p['reason']}")
    print(f"  reuse {rate:.3g}/h (decayed; {p['lookups']} lookups, last {p['last_access_age_s']:.0f} s ago), "
          f"{p['size']} bytes, saves {p['prefill_seconds_saved'] * 1e3:.3g} ms of prefill per hit "
          f"({p['prefill_basis']}); {p['gpu']} at ${p['gpu_price_per_hour']:.3g}/h"
          + ("; pinned" if p.get("pinned") else ""))
    rows = [{"node": t["node_id"], "tier": t["tier"] + (" *" if t["current"] else ""), "priced as": t["offer"],
             "load ms": t["load_s"] * 1e3, "$ saved/reuse": t["saving_per_reuse"], "keep $/h": t["hold_per_hour"],
             "value $/h": t["value_per_hour"], "": t["reason"]} for t in p["tiers"]]
    print(format_table(rows))
    print(f"value = reuse/h x saved/reuse - keep/h; best: {p['choice'] or 'none (below break-even)'}; * = current")


def _keyring(ctl: Ctl, args):
    """The MAC keyring of ``--keys``, else of the config (``security.mac_keys_file``, ``$KDN_MAC_KEYS_FILE``)."""
    from kdn.format.mac import Keyring, load_keyring

    if getattr(args, "keys_file", None):
        return Keyring.from_file(args.keys_file)
    return load_keyring(ctl.config.security)


def _check(data, key: str, keyring) -> dict:
    """Verify one fetched copy: ``status`` ok / forged / corrupt, ``checked`` "MAC" or "checksums only", and
    the header fields or the error."""
    from kdn.format.chunk import verify_object
    from kdn.format.keys import ChunkKey
    from kdn.format.mac import ForgedObject, key_tenant

    try:
        parsed = ChunkKey.parse(key)
        expected = {"fingerprint": parsed.fingerprint, "codec": parsed.codec}
    except KDNError:
        expected = {}
    tenant = key_tenant(key)
    ring = keyring if keyring is not None and keyring.covers(tenant) else None
    out: dict = {"checked": "MAC" if ring is not None else "checksums only"}
    if keyring is not None and ring is None:
        out["note"] = f"the keyring holds no key of tenant {tenant!r}"
    try:
        header = verify_object(data, key=key, keyring=ring, **expected)
    except ForgedObject as exc:
        return {**out, "status": "forged", "error": str(exc)}
    except CorruptObject as exc:
        return {**out, "status": "corrupt", "error": str(exc)}
    return {**out, "status": "ok", "codec": header.codec, "tokens": header.num_tokens, "start": header.start,
            "layers": header.num_layers, "sections": len(header.sections), "bytes": len(data),
            "header_bytes": header.header_len, "fingerprint": header.fingerprint.hex(),
            "key_id": header.key_id or "(unsigned)"}


def _keyring_line(keyring) -> str:
    if keyring is None:
        return ("WARNING: no MAC keyring (security.mac_keys_file, $KDN_MAC_KEYS_FILE or --keys): checked "
                "checksums only, which do not detect forged or moved objects")
    whose = "master keyring (every tenant)" if keyring.holds_master else f"keys of tenant(s) {list(keyring.tenants)}"
    return f"checked MACs and keyed digests with key ids {list(keyring.key_ids)} ({whose})"


def cmd_inspect(ctl: Ctl, args) -> int:
    reply = ctl.call("Lookup", keys=[args.key], prefix=False, probe=True)
    locations = list(reply.results[0].locations) if reply.results else []
    info: dict = {"key": args.key, "locations": [MessageToDict(loc) for loc in locations]}
    if not locations:
        _emit(args, info, [], title=f"{args.key}: not found")
        return 1
    with ctl.node_client(locations[0].address) as node:
        data = node.get_many([args.key])[0]
    if data is None:
        info["error"] = "node did not return the object"
    else:
        checked = _check(data, args.key, _keyring(ctl, args))
        info.update(verified=checked.pop("status") == "ok", **checked)
    placement = _explain(ctl, args.key)
    rows = [{"field": k, "value": v if not isinstance(v, list) else
             "; ".join(f"{loc['nodeId']}/{loc.get('tier', '')}" for loc in v)} for k, v in info.items()]
    if placement is not None:
        info["placement"] = placement
    _emit(args, info, rows, ["field", "value"])
    if placement is not None and not args.json:
        _print_placement(placement)
    return 0 if info.get("verified") else 1


def cmd_verify(ctl: Ctl, args) -> int:
    """Fetch every listed copy of the keys from every node holding it and verify it (MACs with a keyring)."""
    keyring = _keyring(ctl, args)
    keys = list(args.keys)
    if args.prefix:
        keys += [k.key for k in ctl.call("ListKeys", prefix=args.prefix, limit=args.limit).keys]
    if not keys:
        raise KDNError("give keys or --prefix")
    results: list[dict] = []
    for key in dict.fromkeys(keys):
        reply = ctl.call("Lookup", keys=[key], prefix=False, probe=True)
        locations = list(reply.results[0].locations) if reply.results else []
        if not locations:
            results.append({"key": key, "node": "-", "status": "missing", "error": "not listed by the controller"})
            continue
        by_node: dict[str, list] = {}
        for loc in locations:
            by_node.setdefault(loc.address, []).append(loc)
        for address, locs in by_node.items():
            row: dict = {"key": key, "node": locs[0].node_id, "tiers": ",".join(loc.tier for loc in locs)}
            try:
                with ctl.node_client(address) as node:
                    data = node.get_many([key])[0]
            except KDNError as exc:
                results.append({**row, "status": "unreachable", "error": str(exc)})
                continue
            if data is None:
                results.append({**row, "status": "missing", "error": "listed, but the node did not return it"})
                continue
            results.append({**row, **_check(data, key, keyring)})
    bad = sum(r["status"] != "ok" for r in results)
    unchecked = sum(r.get("checked") == "checksums only" for r in results)
    summary = _keyring_line(keyring)
    if keyring is not None and unchecked:
        summary += f"; {unchecked} cop(ies) of other tenants checked by checksums only"
    data = {"mac_checked": keyring is not None and not unchecked, "keyring": repr(keyring) if keyring else None,
            "copies": len(results), "bad": bad, "results": results}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(summary)
        rows = [{"key": r["key"], "node": r["node"], "status": r["status"], "checked": r.get("checked", "-"),
                 "detail": r.get("error") or r.get("note") or r.get("key_id", "")} for r in results]
        print(format_table(rows, ["key", "node", "status", "checked", "detail"]))
        print(f"{len(results) - bad} of {len(results)} copies verified")
    return 1 if bad else 0


def cmd_evict(ctl: Ctl, args) -> int:
    if not args.keys and not args.prefix:
        raise KDNError("give keys or --prefix")
    reply = ctl.call("Evict", keys=args.keys, prefix=args.prefix or "")
    _emit(args, {"evicted": reply.evicted}, title=f"evicted {reply.evicted} object(s)")
    return 0


def cmd_pin(ctl: Ctl, args) -> int:
    method = "Pin" if args.command == "pin" else "Unpin"
    reply = ctl.call(method, keys=args.keys)
    _emit(args, {"changed": reply.changed}, title=f"{method.lower()}ned {reply.changed} key(s)")
    return 0


def cmd_stats(ctl: Ctl, args) -> int:
    stats = MessageToDict(ctl.call("Stats"),
                          always_print_fields_with_no_presence=True)
    nodes = ctl.call("ListNodes").nodes
    rows, per_node = [], []
    for n in nodes:
        row = {"node": n.node_id, "alive": n.alive}
        if n.alive:
            try:
                with ctl.node_client(n.address) as client:
                    s = client.stats()
                row.update(gets=s.gets, hits=s.get_hits, puts=s.puts, bytes_out=s.bytes_out, bytes_in=s.bytes_in,
                           corrupt=s.corrupt_dropped, uptime_s=round(s.uptime_s, 1))
            except KDNError as exc:
                row["error"] = str(exc)
        rows.append(row)
        per_node.append(row)
    _emit(args, {"controller": stats, "nodes": per_node}, rows,
          title=f"controller: {stats.get('keys', 0)} keys, {stats.get('lookups', 0)} lookups, "
                f"{stats.get('lookupHits', 0)}/{stats.get('lookupKeys', 0)} keys hit")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdnctl", description="KDN admin CLI")
    parser.add_argument("--controller", help="controller host:port (default: client.controller of the config)")
    parser.add_argument("--token", help="bearer token (default: client.token of the config)")
    parser.add_argument("--tenant", help="tenant (open mode only; with tokens the token decides)")
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="controller summary").set_defaults(func=cmd_status)
    p = sub.add_parser("nodes", help="storage nodes and their tiers; drain or remove one (admin)",
                       description="List the storage nodes, or drain / remove one (admin token).",
                       epilog="drain: the controller places no new objects on NODE and has every object whose only "
                       "live copy is there copied to another node (NODE keeps serving meanwhile); `kdnctl nodes` "
                       "shows the objects pending. remove: forget NODE and its locations; refused unless NODE is "
                       "dead or drained (--force: anyway). The same NODE process is then refused if it registers "
                       "again; restarted, it registers as a fresh node. See docs/operations.md.")
    p.set_defaults(func=cmd_nodes)
    nodes = p.add_subparsers(dest="nodes_command")
    q = nodes.add_parser("drain", help="stop placing on NODE and copy its only copies elsewhere")
    q.add_argument("node")
    q.add_argument("--undo", action="store_true", help="end the drain: NODE takes new objects again")
    q.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds until nothing is pending (exit 1 if still pending)")
    q.set_defaults(func=cmd_drain)
    q = nodes.add_parser("remove", help="forget a dead or drained NODE and its locations")
    q.add_argument("node")
    q.add_argument("--force", action="store_true",
                   help="remove even an alive node that is not drained (its only copies vanish from lookups)")
    q.set_defaults(func=cmd_remove)
    p = sub.add_parser("ls", help="keys by prefix (tenant/fingerprint/codec/...)")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("inspect", help="locations, verified header and placement numbers of one key")
    p.add_argument("key")
    p.add_argument("--keys", dest="keys_file", help="MAC keys file (default: the config's security.mac_keys_file)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="fetch every copy of keys from every holder and verify it (MACs with keys)")
    p.add_argument("keys", nargs="*")
    p.add_argument("--prefix", help="verify every key with this prefix (within your tenant)")
    p.add_argument("--limit", type=int, default=1000, help="most keys taken from --prefix")
    p.add_argument("--keys", dest="keys_file", help="MAC keys file: a master keyring checks every tenant's objects, "
                   "a tenant's file its own (default: the config's security.mac_keys_file)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("evict", help="delete keys everywhere")
    p.add_argument("keys", nargs="*")
    p.add_argument("--prefix", help="evict every key with this prefix (within your tenant)")
    p.set_defaults(func=cmd_evict)
    for name in ("pin", "unpin"):
        p = sub.add_parser(name, help=f"{name} keys against eviction")
        p.add_argument("keys", nargs="+")
        p.set_defaults(func=cmd_pin)
    sub.add_parser("stats", help="controller and per-node counters").set_defaults(func=cmd_stats)
    # Commands that open their own connections (or none): each adds its parser and sets ``standalone``. Their
    # modules import only the standard library at the top, so every subcommand is listed on a base install; one
    # whose extra is missing says which to install when it runs (``main``).
    for add_parser in (add_cost_parser, add_codec_parser, add_warm_parser, add_secrets_parser):
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "cost" or getattr(args, "standalone", False):
            return args.func(args)
        ctl = Ctl(args)
        try:
            return args.func(ctl, args)
        finally:
            ctl.control.close()
    except (KDNError, CodecError, CostModelError) as exc:
        print(f"kdnctl: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc, f"kdnctl {args.command}")
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
