"""Cost-driven placement in the controller: which node and tier a new chunk goes to, and a periodic pass that
promotes hot chunks, demotes cold ones and evicts those not worth keeping (docs/costmodel.md, "Placement in
the controller").

The numbers come from :mod:`costmodel.placement` (``tier_values``/``rank_tiers``/``eviction_score`` rules over
a chunk's :class:`~costmodel.ChunkStats`); this module only maps the index onto them:

- a node's tier kinds are priced as catalog tiers (``PlacementConfig.offer_map``: memory -> cpu, ...);
- a chunk's prefill time comes from ``Place`` hints (tokens, position, model) through :class:`PrefillEstimator`;
- its reuse rate is the decayed count the index keeps on lookup hits (:class:`~kdn.controller.index.KeyStats`).

Moves stay within a node (its ``Move`` RPC); evictions delete the chunk on that node. Nothing here holds the
index lock while talking to nodes. :class:`CostPlacement` is thread-safe; ``start()`` runs the pass every
``interval_s`` in one background thread, ``run_once(now_s)`` runs one pass (tests and the benchmark drive it
with their own clock).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from costmodel import (
    ChunkStats,
    Compute,
    PlacementPolicy,
    TierOffer,
    TierValue,
    current_rate,
    get_model,
    load_catalog,
    prefill_seconds,
)
from costmodel.catalog import Catalog
from costmodel.errors import CostModelError
from costmodel.placement import tier_values
from costmodel.shapes import ModelShape
from kdn.config import PlacementConfig
from kdn.controller.index import GlobalIndex, KeyStats, NodeRecord, rendezvous_score
from kdn.errors import ConfigError

__all__ = ["PlaceHints", "PrefillEstimator", "Action", "Mover", "CostPlacement"]

log = logging.getLogger(__name__)

MOVE_BATCH = 64


@dataclass(frozen=True)
class PlaceHints:
    """What a client tells ``Place`` about a chunk (all optional)."""

    tokens: int = 0
    start: int = 0
    model: str = ""
    kv_bytes_per_token: int = 0


class PrefillEstimator:
    """GPU seconds a hit on a chunk saves, from what the controller knows.

    A model hint that names a catalog model (``llama-3-8b``, ``meta-llama/Meta-Llama-3-8B-Instruct``) is priced
    exactly (measured throughput or FLOP estimate). Any other model is priced as the default model scaled by the
    ratio of KV bytes per token (bigger KV per token, bigger model, longer prefill). Without a token count the chunk
    is assumed to be raw KV, ``tokens = size / KV bytes per token``.
    """

    def __init__(self, catalog: Catalog, gpu: str, default_model: str) -> None:
        self.catalog = catalog
        self.gpu = catalog.gpu(gpu or None)
        self.default = self._compute(get_model(default_model))
        self._models: dict[str, Compute | None] = {}

    def _compute(self, model: ModelShape) -> Compute:
        return Compute(model, self.gpu, self.catalog.throughput_for(self.gpu.name, model.name))

    def _resolve(self, name: str) -> Compute | None:
        if not name:
            return None
        if name not in self._models:
            found = None
            for candidate in _model_names(name):
                try:
                    found = self._compute(get_model(candidate))
                    break
                except CostModelError:
                    continue
            if len(self._models) > 1000:
                self._models.clear()
            self._models[name] = found
        return self._models[name]

    def estimate(self, size: int, hints: PlaceHints = PlaceHints()) -> tuple[float, str]:
        """``(seconds, basis)`` for a chunk of ``size`` stored bytes."""
        exact = self._resolve(hints.model)
        compute = exact or self.default
        per_token = hints.kv_bytes_per_token or compute.model.kv_bytes_per_token
        tokens = hints.tokens or max(1, size // per_token)
        seconds = prefill_seconds(compute, tokens, hints.start)
        counted = f"{tokens} tokens" + ("" if hints.tokens else " (from size, raw KV assumed)")
        if exact is not None:
            return seconds, f"{compute.model.name} on {self.gpu.name}, {compute.prefill_method}; {counted}"
        scale = per_token / compute.model.kv_bytes_per_token
        return seconds * scale, (f"{compute.model.name} on {self.gpu.name} scaled by KV bytes/token ({scale:.3g}x), "
                                 f"{compute.prefill_method}; {counted}")


def _model_names(model_id: str) -> list[str]:
    """Names to try in the catalog for a model id: as is, its last path part, without vendor prefix/suffixes."""
    base = model_id.rsplit("/", 1)[-1].lower()
    bare = base.removeprefix("meta-")
    for suffix in ("-hf", "-instruct", "-chat", "-it", "-base"):
        bare = bare.removesuffix(suffix)
    return list(dict.fromkeys([model_id, base, bare]))


@dataclass(frozen=True)
class Action:
    """One placement decision for the pass to carry out on a node."""

    kind: str
    """``promote``, ``demote`` or ``evict``."""
    node_id: str
    key: str
    src: str
    """The fastest tier holding the key on the node now."""
    dst: str = ""
    """The tier to make the fastest one (``""`` for ``evict``)."""
    reason: str = ""


class Mover(Protocol):
    """Carries out actions on nodes (the controller's implementation calls the node's ``Move``/``Delete``)."""

    def move(self, record: NodeRecord, keys: list[str], tier: str) -> list[bool]: ...

    def delete(self, record: NodeRecord, keys: list[str]) -> list[bool]: ...


@dataclass
class _Row:
    key: str
    tiers: dict[str, int]
    current: str
    size: int
    pinned: bool
    values: dict[str, TierValue]
    ranked: list[TierValue]
    done: bool = False

    def value(self, tier: str) -> float:
        v = self.values.get(tier)
        return v.value_per_hour if v is not None and v.eligible else -math.inf

    def score(self) -> float:
        """Value per GB-hour where it is now (``eviction_score``): lowest goes first under pressure."""
        return self.value(self.current) / (self.size / 1e9)


class CostPlacement:
    """The controller's placement policy over a :class:`GlobalIndex` (see the module docstring)."""

    def __init__(self, config: PlacementConfig, index: GlobalIndex, mover: Mover | None = None,
                 catalog: Catalog | None = None, clock=time.monotonic) -> None:
        self.config = config
        self.index = index
        self.mover = mover
        self.clock = clock
        try:
            catalog = catalog or load_catalog(config.prices or None, config.price_overrides)
            self.estimator = PrefillEstimator(catalog, config.gpu, config.model)
            gpu = self.estimator.gpu
            self.policy = PlacementPolicy(gpu_price_per_hour=gpu.price_per_hour, load_stall=config.load_stall,
                                          half_life_s=config.half_life_s,
                                          min_value_per_hour=config.min_value_per_hour)
        except CostModelError as exc:
            raise ConfigError(f"placement: {exc}") from exc
        self.offer_names = config.offer_map()
        names = sorted(set(self.offer_names.values()))
        try:
            priced = {o.name: o for o in catalog.tier_offers(gpu, catalog.network(config.network or None), names)}
        except CostModelError as exc:
            raise ConfigError(f"placement.tier_offers: {exc}") from exc
        #: Node tier kind -> offer named by that kind (so costmodel's TierValue.tier is the node's kind).
        self.offers = {kind: replace(priced[name], name=kind) for kind, name in self.offer_names.items()}
        self.counters = {"passes": 0, "promoted": 0, "demoted": 0, "evicted": 0, "failed": 0}
        self.on_pass: Callable[[dict[str, int]], None] | None = None
        """Called with each pass's counts (the controller's Prometheus counters)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> CostPlacement:
        """Run :meth:`run_once` every ``interval_s`` in a background thread (no-op when the interval is 0)."""
        if self.config.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kdn-placement", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the pass must survive anything a node does
                log.exception("placement pass failed")

    # -- the model ---------------------------------------------------------------------------------------------
    def node_offers(self, record: NodeRecord) -> list[TierOffer]:
        """The node's tiers that have a price, fastest first."""
        return [self.offers[kind] for kind, _, _ in record.tiers if kind in self.offers]

    def allows(self, tier: str, key: str) -> bool:
        """Whether ``placement.tier_levels`` lets ``tier`` hold ``key``'s codec level (unlisted tiers: all)."""
        patterns = self.config.tier_levels.get(tier)
        if patterns is None:
            return True
        codec = key.split("/", 3)[2] if key.count("/") >= 3 else ""
        return any(fnmatch.fnmatchcase(codec, pattern) for pattern in patterns)

    def chunk_stats(self, stats: KeyStats, size: int | None = None) -> ChunkStats:
        """Costmodel's view of a key (estimating its prefill time from its size when ``Place`` gave no hints)."""
        if stats.prefill_s <= 0:
            stats.prefill_s, stats.basis = self.estimator.estimate(max(stats.size, 1))
        return ChunkStats(size_bytes=max(size or stats.size, 1), reuse_per_hour=stats.rate,
                          prefill_seconds_saved=stats.prefill_s, last_access_s=max(stats.rate_at, 0.0),
                          max_load_s=self.config.max_load_s or None)

    def _row(self, key: str, tiers: dict[str, int], stats: KeyStats, order: dict[str, int],
             offers: list[TierOffer], now_s: float) -> _Row | None:
        current = min(tiers, key=lambda t: order.get(t, len(order)))
        if current not in self.offers or current not in order:
            return None
        size = tiers[current]
        values = tier_values(self.chunk_stats(stats, size), offers, self.policy, now_s)
        # The same rule as costmodel.rank_tiers, over values computed once.
        ranked = sorted((v for v in values if v.eligible and v.value_per_hour > self.policy.min_value_per_hour
                         and self.allows(v.tier, key)), key=lambda v: (-v.value_per_hour, v.load_s))
        return _Row(key, tiers, current, size, key in self.index.pinned, {v.tier: v for v in values}, ranked)

    def _worth_moving(self, row: _Row, dst: str) -> bool:
        """Hysteresis: with ``h = hysteresis``, move only when ``gain > h · |Δhold|``, i.e. when the reuse rate is
        a fraction ``h`` past the rate at which the two tiers are worth the same (against flapping)."""
        cur, new = row.values.get(row.current), row.values[dst]
        if cur is None or not cur.eligible:
            return True
        gain = new.value_per_hour - cur.value_per_hour
        return gain > 0 and gain >= self.config.hysteresis * abs(new.hold_per_hour - cur.hold_per_hour)

    # -- Place -------------------------------------------------------------------------------------------------
    def place_many(self, keys: list[str], sizes: list[int], hints: list[PlaceHints],
                   now_s: float | None = None) -> list[tuple[NodeRecord, str] | None]:
        """A ``(node, tier hint)`` per key (``None``: no live node). The hint is ``""`` for the node's top tier.

        Over every live node's tiers that can serve the chunk (loading beats recomputing), prefer a tier that
        pays, then one with room below the high watermark, then the larger value; ties (identical nodes) go by
        rendezvous hashing so keys spread. A full tier that pays beats an empty one that does not: the node's LRU
        makes room and the pass sorts out what stays. No such tier anywhere: the rendezvous node, no hint.
        """
        now_s = self.clock() if now_s is None else now_s
        live = self.index.placeable_nodes()  # draining nodes take nothing new
        added: dict[tuple[str, str], int] = defaultdict(int)
        out: list[tuple[NodeRecord, str] | None] = []
        for key, size, hint in zip(keys, sizes, hints):
            prefill, basis = self.estimator.estimate(max(size, 1), hint)
            stats = KeyStats(size=size, tokens=hint.tokens, start=hint.start, prefill_s=prefill, basis=basis,
                             rate_at=now_s)
            stats.access(now_s, self.policy.half_life_s)  # the store is the first use
            self.index.seed(key, stats)
            chunk = self.chunk_stats(stats, max(size, 1))
            best: tuple | None = None
            for record in live:
                usage = {kind: (cap, used) for kind, cap, used in record.tiers}
                score = rendezvous_score(record.node_id, key)
                for v in tier_values(chunk, self.node_offers(record), self.policy, now_s):
                    if not v.eligible or not self.allows(v.tier, key):
                        continue
                    cap, used = usage[v.tier]
                    fits = used + added[(record.node_id, v.tier)] + size <= cap * self.config.high_watermark
                    cand = (v.value_per_hour > self.policy.min_value_per_hour, fits, v.value_per_hour, score)
                    if best is None or cand > best[0]:
                        best = (cand, record, v.tier)
            if best is None:
                record = self.index.place(key, size)
                out.append((record, "") if record is not None else None)
                continue
            _, record, tier = best
            added[(record.node_id, tier)] += size
            out.append((record, "" if tier == record.tiers[0][0] else tier))
        return out

    # -- the periodic pass -------------------------------------------------------------------------------------
    def plan(self, now_s: float | None = None) -> list[tuple[NodeRecord, Action]]:
        """The actions one pass would take, at most ``max_moves_per_pass``."""
        now_s = self.clock() if now_s is None else now_s
        out: list[tuple[NodeRecord, Action]] = []
        for record in self.index.live_nodes():
            out += [(record, a) for a in self._plan_node(record, now_s)]
        return out[:self.config.max_moves_per_pass]

    def _plan_node(self, record: NodeRecord, now_s: float) -> list[Action]:
        cfg = self.config
        offers = self.node_offers(record)
        if not offers:
            return []
        order = {kind: i for i, (kind, _, _) in enumerate(record.tiers)}
        caps = {kind: cap for kind, cap, _ in record.tiers}
        rows = [r for key, tiers, stats in self.index.node_entries(record.node_id)
                if (r := self._row(key, tiers, stats, order, offers, now_s)) is not None]
        used: dict[str, int] = defaultdict(int)
        for row in rows:
            for tier, size in row.tiers.items():
                used[tier] += size
        actions: list[Action] = []

        def room(tier: str, size: int, watermark: float) -> bool:
            return used[tier] + size <= caps.get(tier, 0) * watermark

        def act(row: _Row, kind: str, dst: str, reason: str) -> None:
            if kind == "evict":
                for tier, size in row.tiers.items():
                    used[tier] -= size
            else:
                used[dst] += 0 if dst in row.tiers else row.size
                for tier in row.tiers:
                    if order.get(tier, len(order)) < order[dst]:
                        used[tier] -= row.tiers[tier]
            row.done = True
            actions.append(Action(kind, record.node_id, row.key, row.current, dst, reason))

        def below(row: _Row, tier: str) -> str | None:
            """The best-valued tier slower than ``tier`` with room for the row, if any."""
            return next((v.tier for v in row.ranked if order[v.tier] > order[tier]
                         and room(v.tier, row.size if v.tier not in row.tiers else 0, cfg.high_watermark)), None)

        # 1. The model prefers a slower tier (demote), or no tier at all (evict only if configured to).
        for row in rows:
            if row.pinned:
                continue
            if not row.ranked:
                if cfg.evict_below_break_even:
                    act(row, "evict", "", "not worth keeping in any tier")
                elif not self.allows(row.current, row.key):
                    act(row, "evict", "", f"placement.tier_levels keeps this level out of {row.current}")
                continue
            if order[row.ranked[0].tier] > order[row.current]:
                dst = below(row, row.current)
                if dst is not None and self._worth_moving(row, dst):
                    act(row, "demote", dst, f"{dst} earns more than {row.current} at this reuse rate")
        # 2. Capacity pressure: the lowest value per GB goes first, down a tier or out.
        for tier in sorted(caps, key=order.__getitem__):
            if tier not in self.offers or used[tier] <= caps[tier] * cfg.high_watermark:
                continue
            victims = sorted((r for r in rows if r.current == tier and not r.done and not r.pinned),
                             key=_Row.score)
            for row in victims:
                if used[tier] <= caps[tier] * cfg.low_watermark:
                    break
                dst = below(row, tier)
                if dst is not None:
                    act(row, "demote", dst, f"{tier} under pressure; lowest value per GB")
                else:
                    act(row, "evict", "", f"{tier} under pressure; lowest value per GB, no slower tier pays")
        # 3. The model prefers a faster tier: promote, best value per GB first, while there is room.
        ups = [r for r in rows if not r.done and r.ranked and order[r.ranked[0].tier] < order[r.current]]
        ups.sort(key=lambda r: -r.value(r.ranked[0].tier) / (r.size / 1e9))
        for row in ups:
            for v in row.ranked:
                if order[v.tier] >= order[row.current]:
                    break
                if room(v.tier, row.size, cfg.low_watermark) and self._worth_moving(row, v.tier):
                    act(row, "promote", v.tier, f"{v.tier} earns more than {row.current} at this reuse rate")
                    break
        return actions

    def run_once(self, now_s: float | None = None) -> dict[str, int]:
        """Plan and carry out one pass; returns counts of what was done."""
        with self._lock:
            planned = self.plan(now_s)
            done = {"promoted": 0, "demoted": 0, "evicted": 0, "failed": 0}
            if self.mover is None:
                return done
            groups: dict[tuple[str, str, str], tuple[NodeRecord, list[str]]] = {}
            for record, a in planned:
                groups.setdefault((record.node_id, a.kind, a.dst), (record, []))[1].append(a.key)
            for (_, kind, dst), (record, keys) in groups.items():
                for i in range(0, len(keys), MOVE_BATCH):
                    batch = keys[i:i + MOVE_BATCH]
                    try:
                        if kind == "evict":
                            ok = self.mover.delete(record, batch)
                            self.index.drop_entries(record.node_id, [k for k, y in zip(batch, ok) if y])
                        else:
                            ok = self.mover.move(record, batch, dst)
                    except Exception as exc:  # noqa: BLE001 - a node down must not stop the pass
                        log.warning("placement %s on node %s failed: %s", kind, record.node_id, exc)
                        ok = [False] * len(batch)
                    good = sum(bool(y) for y in ok)
                    done[{"promote": "promoted", "demote": "demoted", "evict": "evicted"}[kind]] += good
                    done["failed"] += len(batch) - good
            self.counters["passes"] += 1
            for name, value in done.items():
                self.counters[name] += value
            if self.on_pass is not None:
                self.on_pass(done)
            if any(done.values()):
                log.info("placement pass: %s", done)
            return done

    # -- explanations ------------------------------------------------------------------------------------------
    def explain(self, key: str, policy: str = "cost", now_s: float | None = None) -> dict[str, Any]:
        """The numbers behind where ``key`` lives (JSON-ready; the ``Explain`` RPC's content)."""
        now_s = self.clock() if now_s is None else now_s
        stats = self.index.stats.get(key)
        holders = self.index.where(key)
        out: dict[str, Any] = {"key": key, "found": bool(holders and stats), "policy": policy,
                               "gpu": self.estimator.gpu.name, "gpu_price_per_hour": self.policy.gpu_price_per_hour,
                               "tiers": []}
        if not out["found"]:
            return out
        chunk = self.chunk_stats(stats)
        out.update(size=stats.size, tokens=stats.tokens, prefill_seconds_saved=chunk.prefill_seconds_saved,
                   prefill_basis=stats.basis, reuse_per_hour=current_rate(chunk, now_s, self.policy.half_life_s),
                   lookups=stats.lookups, last_access_age_s=max(0.0, time.time() - stats.last_access),
                   pinned=key in self.index.pinned, choice="", action="keep", reason="")
        for node_id, tiers in sorted(holders.items()):
            record = self.index.nodes.get(node_id)
            if record is None:
                continue
            order = {kind: i for i, (kind, _, _) in enumerate(record.tiers)}
            row = self._row(key, tiers, stats, order, self.node_offers(record), now_s)
            if row is None:
                continue
            for v in row.values.values():
                out["tiers"].append({"node_id": node_id, "tier": v.tier, "offer": self.offer_names[v.tier],
                                     "eligible": v.eligible, "reason": v.reason, "load_s": v.load_s,
                                     "saving_per_reuse": v.saving_per_reuse, "hold_per_hour": v.hold_per_hour,
                                     "value_per_hour": v.value_per_hour, "current": v.tier == row.current})
            if not out["choice"]:
                out["choice"] = row.ranked[0].tier if row.ranked else ""
                out["action"], out["reason"] = self._verdict(row, order, policy)
        return out

    def _verdict(self, row: _Row, order: dict[str, int], policy: str) -> tuple[str, str]:
        if policy != "cost":
            return "keep", "placement policy 'hash': tiers are left to the node (write policy and LRU)"
        if not row.ranked:
            if row.pinned:
                return "keep", "not worth keeping in any tier, but pinned"
            if self.config.evict_below_break_even:
                return "evict", "not worth keeping in any tier (evict_below_break_even)"
            return "evict-under-pressure", "below break-even in every tier: first to go when a tier fills up"
        best = row.ranked[0].tier
        if best == row.current or not self._worth_moving(row, best):
            return "keep", f"{row.current} is the best tier (within hysteresis)"
        if order[best] < order[row.current]:
            return "promote", f"{best} earns more than {row.current}; moved when it has room"
        if row.pinned:
            return "keep", f"{best} would be cheaper, but the key is pinned"
        return "demote", f"{best} earns more than {row.current} at this reuse rate"
