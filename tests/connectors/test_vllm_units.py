"""The vLLM connector below the engine boundary, in the main venv (no vLLM): paged layout, planning, worker I/O.

The worker tests go through a real KDN cluster (controller + two nodes as subprocesses). The real vLLM engine
is exercised in ``test_vllm_engine.py``.
"""

from __future__ import annotations

import pytest
import torch

from connectors.vllm.config import ConnectorSettings, check_chunk_size
from connectors.vllm.paged import PagedKVLayout
from connectors.vllm.plan import LoadSpec, SaveSpec, SchedulerPlanner
from connectors.vllm.worker import KVWorker
from kdn.client import KDNClient
from kdn.errors import ConfigError

BS, HEADS, DIM, LAYERS, CHUNK = 32, 2, 16, 4, 64


def vec_writer(key, value, key_cache, value_cache, slots) -> None:
    """vLLM CPU ``vec`` ISA order (as probed from the real kernel): keys ``[dim, block]``, values ``[block, dim]``."""
    bs = key_cache.shape[2]
    for i, slot in enumerate(slots.tolist()):
        b, t = divmod(slot, bs)
        for h in range(key.shape[1]):
            k_region = key_cache[b, h].reshape(-1)  # views of the contiguous cache rows
            k_region.view(-1, bs)[:, t] = key[i, h]
            value_cache[b, h, t] = value[i, h]


def paged(writer=vec_writer) -> PagedKVLayout:
    return PagedKVLayout.probe(writer, BS, HEADS, DIM, torch.bfloat16)


def test_probe_finds_the_transposed_key_order():
    layout = paged()
    t, d = 3, 5
    assert int(layout.perm_k[t * DIM + d]) == d * BS + t
    assert torch.equal(layout.perm_v, torch.arange(BS * DIM))


@pytest.mark.parametrize("writer", [vec_writer, None], ids=["vec", "natural"])
def test_scatter_gather_match_the_engine_writer(writer):
    layout = paged(writer) if writer else PagedKVLayout.natural(BS, HEADS, DIM)
    cache = torch.zeros(6, HEADS, BS, 2 * DIM, dtype=torch.bfloat16)
    kv = torch.randn(2, 2 * BS, HEADS, DIM).to(torch.bfloat16)
    layout.scatter(cache, [4, 1], kv)
    assert torch.equal(layout.gather(cache, [4, 1]), kv)
    if writer:  # the engine's own writer produces the same bytes
        ref = torch.zeros_like(cache)
        key_cache, value_cache = ref.view(6, HEADS, 2 * BS, DIM).chunk(2, dim=2)
        writer(kv[0], kv[1], key_cache, value_cache, torch.tensor([4 * BS + i for i in range(BS)]
                                                                   + [1 * BS + i for i in range(BS)]))
        assert torch.equal(ref, cache)
    out = torch.empty(2, BS, HEADS, DIM, dtype=torch.bfloat16)
    assert torch.equal(layout.gather(cache, [1], out=out), kv[:, BS:])


def test_planner_aligns_loads_and_stores():
    stored = {"hit": 0}
    planner = SchedulerPlanner(lambda tokens: stored["hit"], block_size=BS, chunk_size=CHUNK)
    prompt = list(range(200))  # 3 whole chunks (192) + 8
    assert planner.num_new_matched_tokens("a", prompt, 0) == 0
    planner.after_alloc("a", 0)
    plan = planner.build([("a", prompt, list(range(7)), 0)], [], {"a": 200})
    assert plan.loads == [] and [s.req_id for s in plan.saves] == ["a"]
    assert len(plan.saves[0].token_ids) == 192 and plan.saves[0].block_ids == list(range(6))
    planner.finished("a")

    stored["hit"] = 250  # more than usable: capped to whole chunks, leaving >= 1 token to compute
    assert planner.num_new_matched_tokens("b", prompt, 32) == 192 - 32
    planner.after_alloc("b", 160)
    plan = planner.build([("b", prompt, list(range(10, 17)), 192)], [], {"b": 8})
    assert plan.loads == [LoadSpec("b", prompt[:192], list(range(10, 16)), 32, 192)]
    assert plan.saves == []  # every whole chunk came from KDN
    # An identical-length prompt of exactly 3 chunks can load only 2 (one token must be computed).
    assert planner.num_new_matched_tokens("c", list(range(192)), 0) == 128
    # Per-request opt-out.
    assert planner.num_new_matched_tokens("d", prompt, 0, {"kdn_load": False}) == 0


def test_planner_tracks_chunked_prefill_blocks():
    planner = SchedulerPlanner(lambda tokens: 0, block_size=BS, chunk_size=CHUNK)
    prompt = list(range(130))
    planner.num_new_matched_tokens("a", prompt, 0)
    assert planner.build([("a", prompt, [0, 1], 0)], [], {"a": 64}).saves == []
    plan = planner.build([], [("a", [2, 3, 4], False, 64)], {"a": 66})
    assert plan.saves == [SaveSpec("a", prompt[:128], [0, 1, 2, 3])]
    assert planner.build([], [("a", None, False, 130)], {"a": 1}).saves == []  # decoding: saved once


def test_settings_and_chunk_alignment(tmp_path):
    path = tmp_path / "kdn.yaml"
    path.write_text("client: {tenant: acme, codec: lz4, chunk_size: 512}\n")
    settings = ConnectorSettings.from_extra_config({"kdn_config": str(path), "client": {"chunk_size": 256},
                                                    "stats_path": "x.jsonl"}, environ={"KDN_CLIENT__TENANT": "env"})
    assert (settings.client.tenant, settings.client.codec, settings.client.chunk_size) == ("env", "lz4", 256)
    assert settings.stats_path == "x.jsonl" and settings.load and settings.store
    with pytest.raises(ConfigError, match="unknown key"):
        ConnectorSettings.from_extra_config({"tenant": "x"})
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 128"):
        check_chunk_size(200, 128)


def worker(cluster, layout, caches, events):
    client = KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, store_partial=False, tenant="w")
    return KVWorker(client, caches, paged(), on_event=events.append)


def test_worker_store_then_layerwise_load_into_other_blocks(cluster, layout):
    tokens = list(range(500, 500 + 3 * CHUNK))
    nblocks = len(tokens) // BS
    events: list[dict] = []
    src = [torch.randn(16, HEADS, BS, 2 * DIM).to(torch.bfloat16) for _ in range(LAYERS)]
    w = worker(cluster, layout, src, events)
    src_blocks = list(range(2, 2 + nblocks))
    w.begin_saves([SaveSpec("r1", tokens, src_blocks)])
    for i in range(LAYERS):
        w.save_layer(i)
    w.flush_saves()
    w.pending_stores[-1].result(30)
    assert w.client.lookup(tokens).hit_tokens == len(tokens)

    dst = [torch.zeros(16, HEADS, BS, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]
    r = worker(cluster, layout, dst, events)
    dst_blocks = list(range(15, 15 - nblocks, -1))
    r.start_load([LoadSpec("r2", tokens, dst_blocks, BS, len(tokens))])  # first block computed locally
    for i in range(LAYERS):
        r.wait_for_layer(i)
        assert torch.equal(r.layout.gather(dst[i], dst_blocks[1:]), r.layout.gather(src[i], src_blocks[1:]))
        assert not dst[i][dst_blocks[0]].any()
    r._join_loader()
    assert r.take_failed_blocks() == set()
    load = [e for e in events if e["event"] == "load"][-1]
    assert load["tokens"] == len(tokens) - BS and load["bytes"] > 0 and load["chunks"] == 3
    store = [e for e in events if e["event"] == "store"][-1]
    assert (store["stored"], store["failed"]) == (3, 0)

    # A prefix KDN does not have: nothing written, every block reported for recompute.
    other = list(range(9000, 9000 + CHUNK))
    r.start_load([LoadSpec("r3", other, [7, 8], 0, CHUNK)])
    for i in range(LAYERS):
        r.wait_for_layer(i)
    r._join_loader()
    assert r.take_failed_blocks() == {7, 8}
    w.close()
    r.close()


def test_worker_round_trip_through_gpu_backend_strided_caches(cluster, layout):
    """The worker stores from and loads into vLLM's logical GPU-backend views (BLHNC: every layer's page inside
    each block, so each layer's view is strided), layer by layer through a real KDN cluster."""
    from connectors.vllm.paged import StridedKVLayout

    def caches(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        raw = torch.randn(16, LAYERS, HEADS, BS, 2 * DIM, generator=gen).to(torch.bfloat16)  # [B, L, H, N, C]
        return raw, [raw[:, i] for i in range(LAYERS)]

    tokens = list(range(700, 700 + 2 * CHUNK))
    nblocks = len(tokens) // BS
    events: list[dict] = []
    _, src = caches(0)
    paged = StridedKVLayout(BS, HEADS, DIM)
    client = KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, store_partial=False, tenant="w")
    w = KVWorker(client, src, paged, on_event=events.append)
    w.begin_saves([SaveSpec("s1", tokens, list(range(nblocks)))])
    for i in range(LAYERS):
        w.save_layer(i)
    w.flush_saves()
    w.pending_stores[-1].result(30)

    dst_raw, dst = caches(1)
    before = dst_raw.clone()
    client2 = KDNClient(layout, controller=cluster.address, chunk_size=CHUNK, store_partial=False, tenant="w")
    r = KVWorker(client2, dst, paged, on_event=events.append)
    dst_blocks = list(range(15, 15 - nblocks, -1))
    r.start_load([LoadSpec("s2", tokens, dst_blocks, 0, len(tokens))])
    for i in range(LAYERS):
        r.wait_for_layer(i)
    r._join_loader()
    assert r.take_failed_blocks() == set()
    for i in range(LAYERS):
        assert torch.equal(paged.gather(dst[i], dst_blocks), paged.gather(src[i], list(range(nblocks))))
    untouched = [b for b in range(16) if b not in dst_blocks]
    assert torch.equal(dst_raw[untouched], before[untouched])
    w.close()
    r.close()


def test_failed_store_is_counted_in_the_stats(layout):
    """Controller unreachable: the store event still appears, with its chunks counted as failed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    events: list[dict] = []
    src = [torch.randn(4, HEADS, BS, 2 * DIM).to(torch.bfloat16) for _ in range(LAYERS)]
    client = KDNClient(layout, controller=f"127.0.0.1:{port}", chunk_size=CHUNK, store_partial=False, tenant="w",
                       timeout_s=2.0)
    w = KVWorker(client, src, paged(), on_event=events.append)
    w.begin_saves([SaveSpec("f1", list(range(2 * CHUNK)), [0, 1, 2, 3])])
    for i in range(LAYERS):
        w.save_layer(i)
    w.flush_saves()
    for future in w.pending_stores:
        future.result(60)
    store = [e for e in events if e["event"] == "store"]
    assert len(store) == 1 and store[0]["stored"] == 0 and store[0]["failed"] == 2 and store[0]["error"]
    w.close()


def test_default_model_id_identifies_the_weights_not_the_folder(tmp_path):
    from connectors.vllm.config import weights_id

    def folder(name: str, weights: bytes) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
        (path / "model.safetensors").write_bytes(weights)
        (path / "README.md").write_text(name)  # not part of the identity
        return str(path)

    weights = bytes(range(256)) * 4096  # 1 MiB
    a, b = folder("a", weights), folder("b", weights)
    tuned = bytearray(weights)
    tuned[len(weights) // 2: len(weights) // 2 + 64] = b"\xff" * 64  # inside a sampled region
    c = folder("c", bytes(tuned))
    assert weights_id(a, "llama") == weights_id(b, "llama") != weights_id(c, "llama")
    assert weights_id(a, "llama").startswith("llama@")
    assert weights_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_failed_load_is_stored_again():
    """After workers report lost blocks of a load, the request counts as hit only before them and its freshly
    computed chunks are planned for storage."""
    planner = SchedulerPlanner(lambda tokens: 192, block_size=BS, chunk_size=CHUNK)
    prompt = list(range(200))
    assert planner.num_new_matched_tokens("a", prompt, 0) == 192
    planner.after_alloc("a", 192)
    plan = planner.build([("a", prompt, list(range(10, 17)), 192)], [], {"a": 8})
    assert plan.loads and plan.saves == []  # every whole chunk came from KDN: nothing to store
    assert planner.load_failed({99}) == []  # not ours
    assert planner.load_failed({13}) == ["a"]  # block 3 of the load (tokens 96..127) was lost
    assert planner.requests["a"].hit == 64
    plan = planner.build([], [("a", None, False, 64)], {"a": 136})  # vLLM recomputes from token 64
    assert plan.saves == [SaveSpec("a", prompt[:192], list(range(10, 16)))]


# -- hybrid models (several KV cache groups, sliding-window layers) ---------------------------------------------------

W = 64  # sliding window of the hybrid test layout: two blocks
HYBRID_GROUPS = [1, 1, 1, 0]  # layer -> KV cache group: group 0 full attention, group 1 the sliding layers
NULL = 0  # vLLM's null block (BlockPool.null_block)


def hybrid_layout():
    from kdn.format.layout import KVLayout

    return KVLayout("kdn-test/tiny-gemma", num_layers=4, num_kv_heads=1, head_dim=DIM, dtype="bfloat16",
                    layer_types=("sliding_attention",) * 3 + ("full_attention",), sliding_window=W)


def test_planner_carries_every_group_and_plans_async_loads():
    """Block ids per KV cache group (the sliding group's out-of-window blocks are the null block) flow into the
    specs; with asynchronous loads the load is planned at allocation, and a failed one is never retried."""
    hit = {"n": 0}
    planner = SchedulerPlanner(lambda tokens: hit["n"], block_size=BS, chunk_size=CHUNK, num_groups=2,
                               async_loads=True)
    prompt = list(range(200))  # 6 blocks + 8 tokens
    assert planner.num_new_matched_tokens("a", prompt, 0) == 0
    planner.after_alloc("a", 0)
    full, sliding = [1, 2, 3, 4], [NULL, NULL, 5, 6]  # chunked prefill: the sliding group freed its first blocks
    assert planner.build([("a", prompt, (full, sliding), 0)], [], {"a": 128}).saves == []
    plan = planner.build([], [("a", ([7, 8, 9], [10, 11, 12]), False, 128)], {"a": 72})
    assert plan.saves == [SaveSpec("a", prompt[:192], [1, 2, 3, 4, 7, 8],
                                   [[1, 2, 3, 4, 7, 8], [NULL, NULL, 5, 6, 10, 11]])]
    with pytest.raises(ValueError, match="3 KV cache groups, the planner has 2"):
        planner.build([("x", prompt, ([1], [2], [3]), 0)], [], {"x": 1})

    hit["n"] = 192
    assert planner.num_new_matched_tokens("b", prompt, 0) == 192
    groups = ([20, 21, 22, 23, 24, 25, 26], [NULL, NULL, NULL, NULL, 27, 28, 29])
    planner.after_alloc("b", 192, groups)
    load = LoadSpec("b", prompt[:192], groups[0][:6], 0, 192, [groups[0][:6], groups[1][:6]], background=True)
    assert planner.build([], [], {}).loads == [load]  # planned before vLLM schedules the request
    assert planner.build([], [], {}).loads == []
    assert planner.loads_failed({"b", "unknown"}) == ["b"]
    assert planner.num_new_matched_tokens("b", prompt, 0) == 0  # vLLM recomputes it: no second KDN load
    plan = planner.build([("b", prompt, groups, 0)], [], {"b": 200})
    assert plan.loads == [] and [s.req_id for s in plan.saves] == ["b"]  # and stores what it computed


def one_head_paged():
    return PagedKVLayout.probe(vec_writer, BS, 1, DIM, torch.bfloat16)


def test_hybrid_worker_stores_windows_and_loads_into_window_blocks(cluster):
    """Through a real cluster with a HybridClient: the full layer is stored per chunk and the sliding layers only
    as the window before the last chunk boundary, read from the sliding group's live blocks; a load writes the
    full layer's blocks and the sliding layers' window blocks only (never the null block); background loads are
    reported finished, or finished and failed."""
    from kdn.client.hybrid import HybridClient

    layout = hybrid_layout()
    tokens = list(range(900, 900 + 4 * CHUNK))  # 256 tokens, 8 blocks; W = 2 blocks
    n = len(tokens) // BS
    gen = torch.Generator().manual_seed(5)
    src = [torch.randn(24, 1, BS, 2 * DIM, generator=gen).to(torch.bfloat16) for _ in range(4)]
    events: list[dict] = []

    def make(caches, tenant="hyb"):
        client = HybridClient(layout, controller=cluster.address, chunk_size=CHUNK, tenant=tenant)
        return KVWorker(client, caches, one_head_paged(), layer_groups=HYBRID_GROUPS, on_event=events.append)

    w = make(src)
    full_src, sliding_src = list(range(1, 1 + n)), [NULL] * 5 + [17, 18, 19]  # blocks before token 160 freed
    w.begin_saves([SaveSpec("s", tokens, full_src, [full_src, sliding_src])])
    for i in range(4):
        w.save_layer(i)
    w.flush_saves()
    w.pending_stores[-1].result(30)
    store = [e for e in events if e["event"] == "store"][-1]
    assert (store["stored"], store["failed"], store["windows"]) == (4, 0, [len(tokens)])
    assert w.client.lookup(tokens).hit_tokens == len(tokens)
    assert w.client.lookup(tokens[:3 * CHUNK]).hit_tokens == 0  # no window there

    dst = [torch.zeros(24, 1, BS, 2 * DIM, dtype=torch.bfloat16) for _ in range(4)]
    r = make(dst)
    full_dst, sliding_dst = list(range(10, 10 + n)), [NULL] * 6 + [20, 21]  # vLLM allocates only the window
    r.start_load([LoadSpec("l", tokens, full_dst, 0, len(tokens), [full_dst, sliding_dst])])
    for i in range(4):
        r.wait_for_layer(i)
    r._join_loader()
    assert r.take_failed_blocks() == set()
    lay = r.layout
    assert torch.equal(lay.gather(dst[3], full_dst), lay.gather(src[3], full_src))
    for i in range(3):
        assert torch.equal(lay.gather(dst[i], [20, 21]), lay.gather(src[i], [18, 19]))
        assert not dst[i][NULL].any()  # the null block is never written
    load = [e for e in events if e["event"] == "load"][-1]
    bytes_full_layers = 4 * len(tokens) * 2 * DIM * 2
    assert load["tokens"] == len(tokens) and 0 < load["bytes"] < 0.6 * bytes_full_layers

    # Background (asynchronous) loads: the stored prefix is written and reported finished; a missing one is
    # reported finished and failed, and writes nothing.
    bg = [torch.zeros(24, 1, BS, 2 * DIM, dtype=torch.bfloat16) for _ in range(4)]
    b = make(bg)
    b.start_load([LoadSpec("bg1", tokens, full_dst, 0, len(tokens), [full_dst, sliding_dst], background=True),
                  LoadSpec("bg2", list(range(5000, 5000 + CHUNK)), [3, 4], 0, CHUNK, [[3, 4], [5, 6]],
                           background=True)])
    b._background.shutdown(wait=True)
    b._background = None
    assert b.take_finished_loads() == ({"bg1", "bg2"}, {"bg2"})
    assert torch.equal(lay.gather(bg[3], full_dst), lay.gather(src[3], full_src))
    assert torch.equal(lay.gather(bg[0], [20, 21]), lay.gather(src[0], [18, 19]))
    assert not any(bg[i][[3, 4, 5, 6]].any() for i in range(4))

    # A store whose window blocks were already freed stores no window: never a hit on missing KV.
    other = list(range(3000, 3000 + 2 * CHUNK))
    s2 = make(src, tenant="hyb2")
    s2.begin_saves([SaveSpec("s2", other, [1, 2, 3, 4], [[1, 2, 3, 4], [NULL, NULL, NULL, 19]])])
    for i in range(4):
        s2.save_layer(i)
    s2.flush_saves()
    s2.pending_stores[-1].result(30)
    assert [e for e in events if e["event"] == "store"][-1]["windows"] == []
    assert s2.client.lookup(other).hit_tokens == 0
    for x in (w, r, b, s2):
        x.close()
