"""Cost-driven placement in the controller (kdn/placement.py).

Unit tests drive :class:`CostPlacement` over a real :class:`GlobalIndex` with an in-memory fake of the nodes and a
manual clock (fast). The end-to-end test runs a controller and two nodes with three tier kinds (memory, disk, a
real Redis) as processes, drives a hot/cold access trace through a real KDNClient and checks every chunk ends up
where the model says.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from costmodel import choose_tier, load_catalog
from kdn.client import KDNClient
from kdn.config import PlacementConfig, load_config
from kdn.controller.index import GlobalIndex, NodeRecord
from kdn.controller.placement import CostPlacement, PlaceHints
from kdn.errors import ConfigError
from kdn.format.layout import KVLayout
from tests.cluster import Cluster
from tests.servers import require, start_redis, stop
from tests.test_cli import kdnctl

MB = 10**6
CHUNK = 8_400_000  # a 256-token Llama-3-8B chunk after a 4x codec
HINT = PlaceHints(tokens=256, model="llama-3-8b", kv_bytes_per_token=131072)
HOUR = 3600.0


class FakeNodes:
    """Nodes' tier stacks as dicts, with the Move/Delete semantics of kdn.node.tier_stack; reports to the index."""

    def __init__(self, index: GlobalIndex) -> None:
        self.index = index
        self.held: dict[str, dict[str, dict[str, int]]] = {}  # node -> tier -> key -> size

    def add_node(self, node_id: str, tiers: list[tuple[str, int]]) -> NodeRecord:
        record = NodeRecord(node_id, f"{node_id}:1", "", 1, [(k, cap, 0) for k, cap in tiers])
        self.index.register(record)
        self.held[node_id] = {k: {} for k, _ in tiers}
        return record

    def _report(self, node_id: str, added=(), removed=()) -> None:
        record = self.index.nodes[node_id]
        record.tiers = [(k, cap, sum(self.held[node_id][k].values())) for k, cap, _ in record.tiers]
        assert self.index.apply(node_id, 1, False, list(added), list(removed))

    def put(self, node_id: str, key: str, size: int, tier: str = "") -> None:
        tier = tier or next(iter(self.held[node_id]))
        self.held[node_id][tier][key] = size
        self._report(node_id, added=[(key, tier, size)])

    def tier_of(self, node_id: str, key: str) -> str:
        return next((t for t, keys in self.held[node_id].items() if key in keys), "")

    def move(self, record: NodeRecord, keys: list[str], tier: str) -> list[bool]:
        order = list(self.held[record.node_id])
        added, removed = [], []
        for key in keys:
            size = next(held[key] for held in self.held[record.node_id].values() if key in held)
            if key not in self.held[record.node_id][tier]:
                self.held[record.node_id][tier][key] = size
                added.append((key, tier, size))
            for faster in order[:order.index(tier)]:
                if self.held[record.node_id][faster].pop(key, None) is not None:
                    removed.append((key, faster))
        self._report(record.node_id, added, removed)
        return [True] * len(keys)

    def delete(self, record: NodeRecord, keys: list[str]) -> list[bool]:
        removed = [(k, t) for t, held in self.held[record.node_id].items() for k in keys if held.pop(k, None)]
        self._report(record.node_id, removed=removed)
        return [True] * len(keys)


def setup(tiers=(("memory", 1000 * MB), ("disk", 10_000 * MB)), **cfg) -> tuple[CostPlacement, FakeNodes]:
    index = GlobalIndex(node_timeout_s=1e9, half_life_s=cfg.get("half_life_s", HOUR))
    nodes = FakeNodes(index)
    nodes.add_node("a", list(tiers))
    return CostPlacement(PlacementConfig(**cfg), index, nodes), nodes


def store(p: CostPlacement, nodes: FakeNodes, key: str, now: float, size: int = CHUNK, force: str = "") -> str:
    (record, tier), = p.place_many([key], [size], [HINT], now_s=now)
    nodes.put(record.node_id, key, size, force or tier)
    return tier or record.tiers[0][0]


def hit(p: CostPlacement, key: str, now: float, times: int = 1) -> None:
    for _ in range(times):
        assert p.index.lookup([key], prefix=False, access_s=now)[0]


def test_new_chunk_goes_to_the_cheapest_tier_that_pays_and_hot_ones_get_promoted():
    p, nodes = setup()
    # One use (the store) is ~0.7/h with a 1-h half-life: below CPU memory's break-even, above the disk's.
    assert store(p, nodes, "t/k0", now=0.0) == "disk"
    hit(p, "t/k0", 60.0, times=20)
    assert p.run_once(now_s=61.0)["promoted"] == 1
    assert nodes.tier_of("a", "t/k0") == "memory"
    # Still hot an hour later? No: its rate halved; a few hours idle and the model prefers disk again.
    assert p.run_once(now_s=61.0 + 600)["demoted"] == 0
    assert p.run_once(now_s=61.0 + 4 * HOUR)["demoted"] == 1
    assert nodes.tier_of("a", "t/k0") == "disk"


def test_the_pass_agrees_with_costmodel_choose_tier():
    p, nodes = setup(hysteresis=0.0)
    for i in range(12):
        store(p, nodes, f"t/k{i}", now=0.0)
        hit(p, f"t/k{i}", float(i), times=i)  # 0..11 extra uses
    for _ in range(2):
        p.run_once(now_s=20.0)
    record = p.index.nodes["a"]
    for i in range(12):
        stats = p.chunk_stats(p.index.stats[f"t/k{i}"])
        want = choose_tier(stats, p.node_offers(record), p.policy, now_s=20.0)
        assert nodes.tier_of("a", f"t/k{i}") == want, (i, want)
    assert nodes.tier_of("a", "t/k0") == "disk" and nodes.tier_of("a", "t/k11") == "memory"


def test_below_break_even_is_kept_while_there_is_room_unless_configured():
    p, nodes = setup()
    store(p, nodes, "t/cold", now=0.0)
    much_later = 40 * HOUR  # the rate decayed far below every tier's break-even
    assert p.explain("t/cold", now_s=much_later)["action"] == "evict-under-pressure"
    assert p.run_once(now_s=much_later) == {"promoted": 0, "demoted": 0, "evicted": 0, "failed": 0}
    assert nodes.tier_of("a", "t/cold") == "disk"

    p, nodes = setup(evict_below_break_even=True)
    store(p, nodes, "t/cold", now=0.0)
    assert p.run_once(now_s=much_later)["evicted"] == 1
    assert nodes.tier_of("a", "t/cold") == "" and not p.index.locations("t/cold")


def test_tier_levels_keep_raw_levels_out_of_slow_tiers():
    fp = "ab" * 8
    raw, compact = f"t/{fp}/raw/p{'01' * 16}", f"t/{fp}/cachegen-compact/p{'01' * 16}"
    p, nodes = setup()  # no rule: one use pays on disk for both levels
    assert store(p, nodes, raw, now=0.0) == "disk"
    p, nodes = setup(tier_levels={"disk": ["cachegen-*"]})
    assert store(p, nodes, compact, now=0.0) == "disk"
    assert store(p, nodes, raw, now=0.0) == "memory"  # the only tier that may hold it
    # Cold: the compact level stays on disk; the raw copy has nowhere it may go and stays while there is room.
    assert p.run_once(now_s=4 * HOUR)["demoted"] == 0
    assert nodes.tier_of("a", raw) == "memory" and nodes.tier_of("a", compact) == "disk"
    # A raw copy that reached the disk anyway (a node's own spill) is evicted by the pass, the compact one kept.
    p, nodes = setup(tier_levels={"disk": ["cachegen-*"]})
    store(p, nodes, raw, now=0.0, force="disk")
    store(p, nodes, compact, now=0.0, force="disk")
    assert p.run_once(now_s=1.0)["evicted"] == 1
    assert nodes.tier_of("a", raw) == "" and nodes.tier_of("a", compact) == "disk"


def test_pressure_evicts_the_lowest_value_first_and_never_pinned_keys():
    p, nodes = setup(tiers=(("memory", 1000 * MB), ("disk", 100 * MB)))
    for i in range(12):
        store(p, nodes, f"t/k{i}", now=0.0, force="disk")
        hit(p, f"t/k{i}", 1.0, times=i % 3)  # a mild, uneven reuse: all stay on disk
    p.index.pinned.add("t/k0")
    p.run_once(now_s=2.0)
    kept = {i for i in range(12) if nodes.tier_of("a", f"t/k{i}")}
    # 12 x 8.4 MB = 100.8 MB > 95 % of 100 MB: evict down to 90 %, i.e. 2 chunks, the least reused, never k0.
    assert len(kept) == 10 and 0 in kept
    assert all(i % 3 == 0 for i in set(range(12)) - kept)


def test_pinned_keys_are_not_demoted():
    p, nodes = setup()
    store(p, nodes, "t/pin", now=0.0)
    hit(p, "t/pin", 1.0, times=20)
    p.run_once(now_s=2.0)
    assert nodes.tier_of("a", "t/pin") == "memory"
    p.index.pinned.add("t/pin")
    p.run_once(now_s=10 * HOUR)
    assert nodes.tier_of("a", "t/pin") == "memory"
    assert p.explain("t/pin", now_s=10 * HOUR)["action"] == "keep"


def test_promotion_fills_a_tier_only_to_the_low_watermark_best_first():
    p, nodes = setup(tiers=(("memory", 50 * MB), ("disk", 10_000 * MB)))  # 90 % of 50 MB: 5 chunks
    for i in range(8):
        store(p, nodes, f"t/k{i}", now=0.0)
        hit(p, f"t/k{i}", 1.0, times=20 + i)
    assert p.run_once(now_s=2.0)["promoted"] == 5
    assert {i for i in range(8) if nodes.tier_of("a", f"t/k{i}") == "memory"} == {3, 4, 5, 6, 7}


def test_probes_do_not_count_as_accesses():
    p, nodes = setup()
    store(p, nodes, "t/k", now=0.0)
    before = p.index.stats["t/k"].rate
    p.index.lookup(["t/k"], prefix=False, count=False)
    assert p.index.stats["t/k"].rate == before


def test_single_memory_only_node_and_both_policies():
    p, nodes = setup(tiers=(("memory", 1000 * MB),))
    (record, tier), = p.place_many(["t/k"], [CHUNK], [HINT], now_s=0.0)
    assert record.node_id == "a" and tier == ""
    nodes.put("a", "t/k", CHUNK)
    hit(p, "t/k", 1.0, times=20)
    assert p.run_once(now_s=2.0) == {"promoted": 0, "demoted": 0, "evicted": 0, "failed": 0}
    assert p.index.place("t/other", CHUNK).node_id == "a"  # what policy "hash" uses
    assert p.explain("t/k", "hash")["action"] == "keep"


def test_two_identical_nodes_share_new_chunks():
    index = GlobalIndex(node_timeout_s=1e9)
    nodes = FakeNodes(index)
    for name in ("a", "b"):
        nodes.add_node(name, [("memory", 1000 * MB), ("disk", 10_000 * MB)])
    p = CostPlacement(PlacementConfig(), index, nodes)
    placed = p.place_many([f"t/k{i}" for i in range(40)], [CHUNK] * 40, [HINT] * 40, now_s=0.0)
    assert {r.node_id for r, _ in placed} == {"a", "b"} and {t for _, t in placed} == {"disk"}


def test_prefill_estimate_from_hints():
    p, _ = setup()
    exact, basis = p.estimator.estimate(CHUNK, HINT)
    assert exact == pytest.approx(256 / 31100) and "llama-3-8b" in basis
    via_path, _ = p.estimator.estimate(CHUNK, PlaceHints(tokens=256, model="org/llama-3-8b"))
    assert via_path == exact
    scaled, basis = p.estimator.estimate(CHUNK, PlaceHints(tokens=256, model="x/unknown", kv_bytes_per_token=65536))
    assert scaled == pytest.approx(exact / 2) and "scaled" in basis
    from_size, basis = p.estimator.estimate(256 * 131072)  # no hints: raw KV of the default model
    assert from_size == pytest.approx(exact) and "from size" in basis


def test_explain_matches_costmodel():
    p, nodes = setup()
    store(p, nodes, "t/k", now=0.0)
    hit(p, "t/k", 5.0, times=20)
    out = p.explain("t/k", now_s=5.0)
    assert out["found"] and out["choice"] == "memory" and out["action"] == "promote"
    tiers = {t["tier"]: t for t in out["tiers"]}
    assert tiers["disk"]["current"] and not tiers["memory"]["current"]
    assert tiers["memory"]["value_per_hour"] > tiers["disk"]["value_per_hour"] > 0
    assert out["reuse_per_hour"] == pytest.approx(21 * 0.693, rel=0.01)
    assert not p.explain("t/missing")["found"]


def test_config_validation():
    with pytest.raises(ConfigError, match="policy"):
        load_config(overrides={"placement.policy": "lru"}, environ={})
    with pytest.raises(ConfigError, match="watermark"):
        load_config(overrides={"placement.low_watermark": "0.99"}, environ={})
    cfg = load_config(overrides={"placement.tier_offers": "{nvme: disk}"}, environ={}).placement
    assert cfg.offer_map()["nvme"] == "disk" and cfg.offer_map()["memory"] == "cpu"
    with pytest.raises(ConfigError, match="tier_offers"):
        CostPlacement(PlacementConfig(tier_offers={"nvme": "tape"}), GlobalIndex())
    # The catalog path and overrides reach the model.
    p = CostPlacement(PlacementConfig(price_overrides=["gpus.h100.price_per_hour=1.0"]), GlobalIndex(),
                      catalog=None)
    assert p.policy.gpu_price_per_hour == 1.0 and load_catalog().gpu("h100").price_per_hour != 1.0


def test_tier_stack_promote_on_hit_can_be_turned_off():
    from kdn.node.tier_stack import TierStack
    from kdn.node.tiers.memory import MemoryTier

    class Slow(MemoryTier):
        kind = "slow"

    from kdn.format.chunk import build_object
    from kdn.format.keys import prefix_keys

    (_, key), = prefix_keys(list(range(8)), "default", bytes(16), "raw", 8)
    k = str(key)
    obj = build_object(codec="raw", key=k, fingerprint=bytes(16), num_tokens=8, start=0, num_layers=1,
                       sections=[(0, 1, b"x" * 100)])  # the node checks headers of what memory tiers serve
    stack = TierStack([MemoryTier(1 << 20), Slow(1 << 20)])
    stack.tiers[1].put_many([(k, obj)])
    stack.promote_on_hit = False
    assert stack.get_many([k])[0][1] == "slow" and stack.locate_many([k]) == ["slow"]
    stack.promote_on_hit = True
    assert stack.get_many([k])[0][1] == "slow" and stack.locate_many([k]) == ["memory"]


# -- end to end ---------------------------------------------------------------------------------------------------
TOKENS = 64  # one chunk per prompt, so each chunk's accesses are independent
# A catalog model name: the controller prices prefill exactly (64 tokens of Llama-3-8B: 2 ms on an H100). The
# shape is tiny so objects are 32 KiB.
E2E_LAYOUT = KVLayout("llama-3-8b", num_layers=4, num_kv_heads=2, head_dim=16)


def _where(cluster: Cluster, keys: list[str]) -> dict[str, tuple[str, str]]:
    """``key -> (node, fastest tier)`` from a probe lookup (which does not count as a use)."""
    from kdn.v1 import control_pb2, control_pb2_grpc
    from kdn.wire.rpc import make_channel

    with make_channel(cluster.address) as channel:
        reply = control_pb2_grpc.ControlStub(channel).Lookup(
            control_pb2.LookupRequest(keys=keys, prefix=False, probe=True), timeout=5)
    return {r.key: (r.locations[0].node_id, r.locations[0].tier) if r.locations else ("", "") for r in reply.results}


def test_hot_chunks_end_in_memory_cold_ones_are_demoted(tmp_path):
    require("redis-server")
    redis, url = start_redis(tmp_path)
    # A 1-s half-life makes rates move within seconds; CPU memory priced at $1/GB-h puts its break-even against
    # disk/redis at a few hundred uses per hour, i.e. a chunk unused for ~3-5 s is demoted.
    c = Cluster(tmp_path, common=["--set", "placement.interval_s=0.3", "--set", "placement.half_life_s=1",
                                  "--set", "placement.price_overrides=[tiers.cpu.per_gb_hour=1.0]"])
    try:
        c.start_controller()
        c.start_node("node-a", tiers="[{kind: memory, capacity: 64MiB}, {kind: disk, capacity: 1GiB}]")
        c.start_node("node-b", tiers=f"[{{kind: memory, capacity: 64MiB}}, "
                                     f"{{kind: redis, url: '{url}', key_prefix: 'kdn-placement:', capacity: 1GiB}}]")
        c.wait_nodes(2)
        prompts = [list(range(i * 1000, i * 1000 + TOKENS)) for i in range(12)]
        kvs = [torch.randn(E2E_LAYOUT.shape(TOKENS), generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
               for i in range(12)]
        hot = range(4)
        with KDNClient(E2E_LAYOUT, controller=c.address, chunk_size=TOKENS) as client:
            keys = [str(client.keys(p)[0][1]) for p in prompts]
            hot_keys = {keys[i] for i in hot}
            for p, kv in zip(prompts, kvs):
                assert client.store(p, kv).result(30).stored == 1
            # Fresh chunks are worth memory (one use = ~2,500/h at this half-life) and land there (write-through
            # keeps a copy below). Keep the hot ones busy; the cold ones cool down and move down a tier.
            want_cold = {"node-a": "disk", "node-b": "redis"}
            deadline = time.monotonic() + 30
            while True:
                for i in hot:
                    assert client.lookup(prompts[i]).hit_tokens == TOKENS
                where = _where(c, keys)
                if (all(where[keys[i]][1] == "memory" for i in hot)
                        and all(tier == want_cold[node] for k, (node, tier) in where.items() if k not in hot_keys)):
                    break
                assert time.monotonic() < deadline, f"placement did not converge: {where}"
                time.sleep(0.1)
            assert {node for node, _ in where.values()} == {"node-a", "node-b"}, "both nodes (and tiers) used"
            # A cold chunk that is used again is promoted back by the next pass.
            deadline = time.monotonic() + 10
            while _where(c, [keys[5]])[keys[5]][1] != "memory":
                assert client.lookup(prompts[5]).hit_tokens == TOKENS
                assert time.monotonic() < deadline, "a re-used chunk was not promoted"
                time.sleep(0.2)
            # Demoted chunks still serve the same bytes; the hot ones from memory.
            for p, kv in zip(prompts, kvs):
                assert torch.equal(client.retrieve(p).kv, kv)
        # kdnctl inspect shows the numbers; the model agrees with where a hot chunk lives.
        info = json.loads(kdnctl(c.address, "--json", "inspect", keys[0]).stdout)
        placement = info["placement"]
        assert placement["policy"] == "cost" and placement["choice"] == "memory"
        assert placement["prefill_basis"].startswith("llama-3-8b on h100")
        assert {t["tier"] for t in placement["tiers"]} >= {"memory"}
        human = kdnctl(c.address, "inspect", keys[0])
        assert human.returncode == 0 and "value $/h" in human.stdout
    finally:
        c.close()
        stop(redis)


def test_hash_policy_on_a_single_memory_node(tmp_path):
    c = Cluster(tmp_path, common=["--set", "placement.policy=hash"])
    layout = KVLayout("kdn-test/tiny", num_layers=2, num_kv_heads=1, head_dim=16)
    try:
        c.start_controller()
        c.start_node("solo", tiers="[{kind: memory, capacity: 16MiB}]")
        c.wait_nodes(1)
        tokens = list(range(40))
        kv = torch.randn(layout.shape(40)).to(torch.bfloat16)
        with KDNClient(layout, controller=c.address, chunk_size=16) as client:
            assert client.store(tokens, kv).result(30).stored == 3
            assert torch.equal(client.retrieve(tokens).kv, kv)
            key = str(client.keys(tokens)[0][1])
        info = json.loads(kdnctl(c.address, "--json", "inspect", key).stdout)
        assert info["verified"] and info["placement"]["policy"] == "hash"
    finally:
        c.close()
