"""Cost of cost-driven placement vs LRU-only vs no cache on a Zipf reuse trace of RAG chunks (a simulation).

No servers: one simulated storage node runs the real :class:`~kdn.node.tier_stack.TierStack` (write-through, LRU tiers,
promotion on hit) over size-only tiers, reporting to the real :class:`~kdn.controller.index.GlobalIndex`; the
cost-driven
run adds the controller's :class:`~kdn.controller.placement.CostPlacement` (``Place`` hints and the periodic pass, on a
simulated clock), exactly as the controller runs them. Every request looks its chunk up; a hit is fetched from
the tier that holds it, a miss is recomputed and stored. Costs come from the cost model (docs/costmodel.md):

- compute: GPU time of recomputed prefills, plus GPU time stalled while a hit loads (``load_stall``);
- storage: stored GB-hours of every tier at its catalog price (integrated over the trace);
- transfer: per-GB and per-request fees of fetches and stores.

Prompt prefill and decode are the same with or without a cache, so they are left out of every total.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from costmodel import get_model, load_catalog
from kdn.bench import format_table
from kdn.config import PlacementConfig, parse_size
from kdn.controller.index import GlobalIndex, NodeRecord
from kdn.controller.placement import CostPlacement, PlaceHints
from kdn.node.tier_stack import TierStack
from kdn.node.tiers.base import Tier

__all__ = ["add_arguments", "run", "simulate"]

NODE = "sim"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=20_000, help="distinct RAG chunks in the corpus")
    parser.add_argument("--zipf", type=float, default=0.9, help="Zipf exponent of chunk popularity")
    parser.add_argument("--rate", type=float, default=20_000, help="chunk requests per hour")
    parser.add_argument("--hours", type=float, default=6.0, help="simulated duration (starting with empty tiers)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="tokens per stored chunk")
    parser.add_argument("--model", default="llama-3-8b", help="catalog model (KV shape and prefill speed)")
    parser.add_argument("--gpu", default="h100", help="catalog GPU")
    parser.add_argument("--compression", type=float, default=4.0, help="codec ratio: raw KV bytes / stored bytes")
    parser.add_argument("--capacities", default="4GB/40GB,16GB/200GB,64GB/1TB",
                        help="comma-separated MEMORY/DISK tier capacities, one comparison each")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between placement passes")
    parser.add_argument("--evict-below-break-even", action="store_true",
                        help="also run cost-driven placement with placement.evict_below_break_even")
    parser.add_argument("--half-life", type=float, default=3600.0, help="half-life of the decayed reuse rate, s")
    parser.add_argument("--seed", type=int, default=0)


class _Sized:
    """Stands in for an object's bytes: only its length matters to the simulation."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class SizeTier(Tier):
    """An LRU tier that only counts bytes (same eviction contract as the real tiers)."""

    def __init__(self, kind: str, capacity: int, durable: bool) -> None:
        super().__init__()
        self.kind, self.durable = kind, durable
        self._capacity = capacity
        self._used = 0
        self._items: OrderedDict[str, int] = OrderedDict()

    def put_many(self, items: Sequence[tuple[str, object]]) -> list[bool]:
        out = []
        for key, data in items:
            size = len(data)
            if key in self._items:
                out.append(True)
                continue
            if size > self._capacity:
                out.append(False)
                continue
            while self._used + size > self._capacity:
                old, old_size = self._items.popitem(last=False)
                self._used -= old_size
                self._evicted(old, _Sized(old_size))
            self._items[key] = size
            self._used += size
            out.append(True)
        return out

    def get_many(self, keys: Sequence[str]) -> list[object | None]:
        out = []
        for key in keys:
            size = self._items.get(key)
            if size is not None:
                self._items.move_to_end(key)
            out.append(None if size is None else _Sized(size))
        return out

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in self._items for k in keys]

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        out = []
        for key in keys:
            size = self._items.pop(key, None)
            if size is not None:
                self._used -= size
            out.append(size is not None)
        return out

    def keys(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._items.items()))

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used


class SimNode:
    """A storage node's tier stack wired to the index, and the controller's mover for it."""

    def __init__(self, index: GlobalIndex, capacities: list[tuple[str, int, bool]]) -> None:
        self.index = index
        self.stack = TierStack([SizeTier(k, c, d) for k, c, d in capacities], "write-through",
                               on_change=self._changed)
        self.record = NodeRecord(NODE, "sim:0", "", 1, self._usage())
        index.register(self.record)

    def _usage(self) -> list[tuple[str, int, int]]:
        return [(t.kind, t.capacity_bytes, t.used_bytes) for t in self.stack.tiers]

    def _changed(self, added: list, removed: list) -> None:
        self.record.tiers = self._usage()
        self.index.apply(NODE, 1, False, added, removed)

    def move(self, record: NodeRecord, keys: list[str], tier: str) -> list[bool]:
        return self.stack.move_many(keys, tier)

    def delete(self, record: NodeRecord, keys: list[str]) -> list[bool]:
        return self.stack.delete_many(keys)


def _trace(args: argparse.Namespace) -> Iterator[tuple[float, int]]:
    """``(time_s, chunk)``: Poisson arrivals, Zipf-distributed chunks (rank 0 most popular)."""
    rng = random.Random(args.seed)
    weights = [1.0 / (i + 1) ** args.zipf for i in range(args.chunks)]
    cum = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    perm = list(range(args.chunks))
    rng.shuffle(perm)  # popularity is unrelated to the key (so no policy can exploit key order)
    t, end, per_s = 0.0, args.hours * 3600.0, args.rate / 3600.0
    while True:
        t += rng.expovariate(per_s)
        if t >= end:
            return
        yield t, perm[bisect.bisect_left(cum, rng.random() * total)]


def simulate(args: argparse.Namespace, policy: str, memory: str = "4GB", disk: str = "40GB",
             evict_below_break_even: bool = False) -> dict:
    """Replay the trace under ``policy`` (``cost``, ``lru`` or ``none``) with the given tier capacities; returns
    its costs and hit counts."""
    catalog = load_catalog()
    model = get_model(args.model)
    cfg = PlacementConfig(gpu=args.gpu, model=model.name, half_life_s=args.half_life,
                          evict_below_break_even=evict_below_break_even, interval_s=args.interval)
    index = GlobalIndex(node_timeout_s=math.inf, half_life_s=args.half_life)
    node = SimNode(index, [("memory", parse_size(memory), False), ("disk", parse_size(disk), True)])
    placement = CostPlacement(cfg, index, node, catalog=catalog, clock=lambda: 0.0)
    offers = {kind: placement.offers[kind] for kind, _, _ in node.record.tiers}
    gpu_h = placement.policy.gpu_price_per_hour / 3600.0
    size = max(1, int(model.kv_bytes(args.chunk_tokens) / args.compression))
    gb = size / 1e9
    hints = PlaceHints(tokens=args.chunk_tokens, model=model.name, kv_bytes_per_token=model.kv_bytes_per_token)
    prefill_s, _ = placement.estimator.estimate(size, hints)
    node.stack.promote_on_hit = policy != "cost"  # the controller turns it off under cost-driven placement
    cost = {"compute": 0.0, "storage": 0.0, "transfer": 0.0}
    hits = {kind: 0 for kind in offers}
    requests = misses = 0
    last_t = next_pass = 0.0
    for t, chunk in _trace(args):
        requests += 1
        if policy == "none":
            cost["compute"] += gpu_h * prefill_s
            continue
        cost["storage"] += (t - last_t) / 3600.0 * sum(
            tier.used_bytes / 1e9 * offers[tier.kind].per_gb_hour for tier in node.stack.tiers)
        last_t = t
        if policy == "cost":
            while next_pass <= t:
                placement.run_once(now_s=next_pass)
                next_pass += args.interval
        key = f"rag/{chunk}"
        if index.lookup([key], prefix=False, access_s=t)[0]:
            found = node.stack.get_many([key])[0]
            if found is not None:
                offer = offers[found[1]]
                hits[found[1]] += 1
                load_s = offer.latency_s + gb / offer.bandwidth_gbps
                cost["compute"] += gpu_h * cfg.load_stall * load_s
                cost["transfer"] += gb * offer.egress_per_gb + offer.get_fee
                continue
        misses += 1
        cost["compute"] += gpu_h * prefill_s
        if policy == "cost":
            (_, tier), = placement.place_many([key], [size], [hints], now_s=t)
        else:
            tier = ""
        node.stack.put_many([(key, _Sized(size))], tier=tier)
        for kind in index.where(key).get(NODE, {}):
            cost["transfer"] += gb * offers[kind].egress_per_gb + offers[kind].put_fee
    total = sum(cost.values())
    return {"policy": policy, "requests": requests, "misses": misses, "hits": hits, **cost, "total": total,
            "object_bytes": size, "prefill_s": prefill_s, "moves": dict(placement.counters)}


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    nocache = simulate(args, "none")
    runs: list[tuple[str, str, dict]] = []
    rows = []
    for capacity in args.capacities.split(","):
        memory, _, disk = capacity.strip().partition("/")
        variants = [("LRU only", simulate(args, "lru", memory, disk)),
                    ("cost-driven", simulate(args, "cost", memory, disk))]
        if args.evict_below_break_even:
            variants.append(("cost-driven, evict below break-even",
                             simulate(args, "cost", memory, disk, evict_below_break_even=True)))
        base = variants[0][1]["total"]
        for name, r in variants:
            runs.append((capacity, name, r))
            rows.append({"memory/disk": capacity.strip(), "placement": name,
                         "hit %": 100.0 * sum(r["hits"].values()) / max(r["requests"], 1),
                         "memory hit %": 100.0 * r["hits"].get("memory", 0) / max(r["requests"], 1),
                         "compute $": r["compute"], "storage $": r["storage"], "transfer $": r["transfer"],
                         "total $": r["total"], "vs LRU": r["total"] / base if base else math.nan,
                         "vs no cache": r["total"] / nocache["total"] if nocache["total"] else math.nan})
    size = nocache["object_bytes"]
    print(f"{args.chunks:,} RAG chunks of {args.chunk_tokens} tokens ({args.model}, {size / 1e6:.1f} MB stored at "
          f"{args.compression:g}x; recompute {nocache['prefill_s'] * 1e3:.1f} ms on {args.gpu}), Zipf {args.zipf}, "
          f"{args.rate:,.0f} requests/h for {args.hours:g} h from empty tiers; pass every {args.interval:g} s, "
          f"half-life {args.half_life:g} s; no cache costs ${nocache['total']:.3f}")
    print(format_table(rows))
    print(f"costs in $ over the trace (prompt prefill and decode excluded: the same in every run); "
          f"simulated in {time.perf_counter() - t0:.0f} s")
    params = {k: v for k, v in vars(args).items() if k not in ("func", "bench_module")}
    return {"rows": rows, "params": params, "no_cache": nocache,
            "runs": [dict(r, capacities=c, name=n) for c, n, r in runs]}
