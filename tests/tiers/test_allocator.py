"""The two-level allocator and the pool index: invariants under random alloc/free sequences (hypothesis)."""

from __future__ import annotations

import math
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdn.node.tiers.allocator import PoolIndex, TwoLevelAllocator, page_bytes_for

G = 256  # a small granule keeps the arenas of these tests small


def check(alloc: TwoLevelAllocator) -> None:
    """No overlap, aligned, inside the arena, every byte accounted, empty pages released."""
    live = alloc.live()
    spans = sorted((off, off + reserved, size) for off, (size, reserved) in live.items())
    end_of_pages = alloc.num_pages * alloc.page_bytes
    for (start, end, size), nxt in zip(spans, spans[1:] + [(end_of_pages, 0, 0)]):
        assert start % alloc.granularity == 0 and size <= end - start and end <= nxt[0]
    s = alloc.stats()
    assert s.objects == len(live) and s.object_bytes == sum(size for size, _ in live.values())
    assert s.object_bytes + s.internal_bytes + s.stranded_bytes + s.free_bytes + s.remainder_bytes == s.arena_bytes
    assert min(s.internal_bytes, s.stranded_bytes, s.tail_bytes) >= 0
    used_pages = {p for start, end, _ in spans for p in range(start // alloc.page_bytes,
                                                              (end - 1) // alloc.page_bytes + 1)}
    kinds = alloc.page_kinds()
    assert {p for p, k in enumerate(kinds) if k != "free"} == used_pages  # a page is free iff nothing lives on it
    assert s.free_pages == kinds.count("free") and s.slab_pages + s.variable_pages + s.free_pages == s.pages


configs = st.fixed_dictionaries({
    "pages": st.integers(1, 12),
    "declared": st.lists(st.integers(1, 40 * G), max_size=3),
    "extra": st.integers(0, 3 * G),
})
ops = st.lists(st.tuples(st.booleans(), st.integers(1, 48 * G), st.integers(0, 10 ** 6)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(configs, ops)
def test_random_alloc_free_keeps_invariants(cfg, seq):
    declared = cfg["declared"]
    largest = max([*declared, 40 * G])
    page = (-(-largest // G)) * G
    alloc = TwoLevelAllocator(page * cfg["pages"] + cfg["extra"], object_sizes=declared, granularity=G,
                              page_bytes=page)
    offsets: list[int] = []
    for is_alloc, size, pick in seq:
        if is_alloc or not offsets:
            off = alloc.allocate(size)
            if off is not None:
                offsets.append(off)
        else:
            alloc.free(offsets.pop(pick % len(offsets)))
        check(alloc)
    for off in offsets:
        alloc.free(off)
    check(alloc)
    s = alloc.stats()
    assert s.free_pages == s.pages and s.object_bytes == 0 and s.stranded_bytes == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 30 * G), min_size=1, max_size=60), st.integers(1, 30 * G), st.randoms())
def test_frees_room_for_is_truthful(sizes, want, rnd):
    """When an allocation fails and frees_room_for(victim) says yes, freeing that victim makes it succeed."""
    alloc = TwoLevelAllocator(4 * 32 * G, object_sizes=[9 * G, 16 * G], granularity=G, page_bytes=32 * G)
    offsets = [o for o in (alloc.allocate(s) for s in sizes) if o is not None]
    if alloc.allocate(want) is not None or not offsets:
        return
    victim = rnd.choice(offsets)
    if alloc.frees_room_for(victim, want):
        alloc.free(victim)
        assert alloc.allocate(want) is not None


def test_free_of_unknown_offset_raises():
    alloc = TwoLevelAllocator(64 * G, granularity=G, page_bytes=16 * G)
    off = alloc.allocate(G)
    alloc.free(off)
    with pytest.raises(ValueError):
        alloc.free(off)
    assert alloc.allocate(64 * G + 1) is None  # larger than the arena: never


def test_page_size_is_the_lcm_when_small():
    page = page_bytes_for(1 << 30, [3 * 4096, 4 * 4096 - 100], granularity=4096, min_pages=64)
    assert page % (12 * 4096) == 0 and page <= (1 << 30) // 64
    assert page_bytes_for(1 << 30, granularity=4096, min_pages=64) == (1 << 30) // 64


def test_page_size_when_the_lcm_explodes():
    mib = 1 << 20
    sizes = [32 * mib + 1100, 14 * mib + 1000, 5898240 + 1000]  # three chunk layouts with headers
    units = [-(-s // 4096) for s in sizes]
    assert math.lcm(*units) * 4096 > 1 << 40
    page = page_bytes_for(8 << 30, sizes, granularity=4096, min_pages=32)
    assert (8 << 30) // 64 <= page <= (8 << 30) // 32
    assert any(page % (u * 4096) == 0 for u in units)
    assert max(page % (u * 4096) for u in units) / page < 0.01  # worst slab page tail under 1 %


def test_declared_sizes_fill_slab_pages_exactly():
    sizes = [10 * G, 7 * G]
    alloc = TwoLevelAllocator(70 * G * 8, object_sizes=sizes, granularity=G, page_bytes=70 * G)
    offs = [alloc.allocate(s - 5) for s in sizes for _ in range(7)]
    s = alloc.stats()
    assert None not in offs and s.slab_pages == 2 and s.variable_pages == 0
    assert s.internal_bytes == 14 * 5 and s.stranded_bytes == 3 * 7 * G
    odd = alloc.allocate(3 * G)  # not a declared size: a variable page
    assert alloc.stats().variable_pages == 1 and alloc.page_kinds()[odd // (70 * G)] == "variable"
    for off in offs + [odd]:
        alloc.free(off)
    assert alloc.stats().free_pages == 8


def test_variable_extents_span_adjacent_pages_and_pages_come_back():
    alloc = TwoLevelAllocator(4 * 10 * G, granularity=G, page_bytes=10 * G)
    a = alloc.allocate(6 * G)
    b = alloc.allocate(6 * G)  # 4 granules left in the first variable page: b spans into the next one
    assert alloc.stats().variable_pages == 2 and b == a + 6 * G
    alloc.free(a)
    assert alloc.stats().variable_pages == 2  # b still overlaps both pages
    alloc.free(b)
    check(alloc)
    assert alloc.stats().free_pages == 4


def test_objects_larger_than_a_page_span_variable_pages():
    alloc = TwoLevelAllocator(4 * 10 * G, object_sizes=[10 * G], granularity=G, page_bytes=10 * G)
    slab = alloc.allocate(10 * G)  # slab pages come from the top of the arena: page 3
    assert slab == 30 * G
    assert alloc.allocate(35 * G) is None  # pages 0-2 are carved, 30 granules are not enough: given back
    assert alloc.stats().free_pages == 3 and alloc.stats().stranded_bytes == 0
    big = alloc.allocate(25 * G)
    assert big == 0 and alloc.page_kinds() == ["variable", "variable", "variable", "slab:2560"]
    check(alloc)
    alloc.free(big)
    alloc.free(slab)
    assert alloc.stats().free_pages == 4


def test_fallbacks_before_eviction():
    page = 32 * G
    alloc = TwoLevelAllocator(2 * page, object_sizes=[8 * G], granularity=G, page_bytes=page)
    slab = [alloc.allocate(8 * G) for _ in range(4)]  # page 0: a full slab page
    var = alloc.allocate(30 * G)  # page 1: variable, 2 granules left
    assert None not in slab and var is not None
    assert alloc.allocate(8 * G) is None  # no slot, no page, no hole of 8 granules
    alloc.free(slab[0])
    assert alloc.allocate(7 * G) == slab[0]  # a variable object borrows the free slot (8/7 <= 1.25)
    alloc.free(var)
    assert alloc.allocate(8 * G) is not None  # page 1 came free: a second slab page


def test_threads_allocating_and_freeing():
    alloc = TwoLevelAllocator(64 * 16 * G, object_sizes=[4 * G], granularity=G, page_bytes=16 * G)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[int] = []
        try:
            for _ in range(400):
                if mine and rng.random() < 0.45:
                    alloc.free(mine.pop(rng.randrange(len(mine))))
                else:
                    off = alloc.allocate(rng.choice([4 * G, rng.randrange(1, 12 * G)]))
                    if off is not None:
                        mine.append(off)
            for off in mine:
                alloc.free(off)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check(alloc)
    assert alloc.stats().free_pages == 64


def test_pool_index_pins_evictions_and_deferred_free():
    alloc = TwoLevelAllocator(4 * 8 * G, object_sizes=[8 * G], granularity=G, page_bytes=8 * G)
    index = PoolIndex(alloc)
    for key in "abcd":
        index.publish(index.reserve(key, 8 * G))
    pinned = index.pin("a")  # a is the least recently used one, but pinned
    index.lookup("b")  # b becomes most recent: c is now the oldest unpinned
    victims: list[str] = []
    entry = index.reserve("e", 8 * G, lambda v: victims.append(v.key))
    assert victims == ["c"] and entry is not None and entry.offset != pinned.offset
    index.publish(entry)
    assert index.remove("a") is pinned and "a" not in index and index.pinned == 1
    assert alloc.stats().objects == 4  # a's slot is still held by its pin
    index.unpin(pinned)
    assert alloc.stats().objects == 3 and index.pinned == 0
    for key in "bde":
        index.pin(key)
    assert index.reserve("f", 8 * G) is not None  # a's freed slot
    assert index.reserve("g", 8 * G) is None  # everything else pinned or pending: no victim


# -- hybrid-model objects (kdn bench tiers' churn, docs/tiers.md) ------------------------------------------------
HYBRID_MIXES = ["+gemma-3-270m", "+both hybrids", "hybrids only"]


@pytest.fixture(scope="module")
def churn_models():
    from kdn.bench.tiers import churn_models

    return churn_models()


def test_churn_object_sizes_are_the_real_objects(churn_models):
    """The churn's sizes are those of real chunk objects (same tenant length as the bench's keys): Gemma 3 270M's
    full-layer chunk and its window object."""
    import torch

    from codec.raw import torch_dtype
    from kdn.bench.tiers import CHUNK_TOKENS, model_layouts
    from kdn.client.hybrid import window_key
    from kdn.format.chunk_codec import encode_chunk
    from kdn.format.keys import ChunkKey, KeyKind

    layout = model_layouts()["gemma-3-270m"]
    m = churn_models["gemma-3-270m"]
    full, sliding = layout.part_layout("full"), layout.part_layout("sliding")
    assert (m.chunk_layers, m.window_layers, m.window) == (3, 15, 512)
    key = ChunkKey("bench", full.fingerprint(), "raw", KeyKind.PREFIX, bytes(range(20)))
    for part, tokens, name, header in ((full, CHUNK_TOKENS, key, m.chunk_header),
                                       (sliding, m.window, window_key(key, sliding.fingerprint(), 512),
                                        m.window_header)):
        kv = torch.zeros(part.shape(tokens), dtype=torch_dtype(part.dtype))
        obj = encode_chunk(kv, key=str(name), layout=part, codec="raw")
        assert len(obj) == header + tokens * part.bytes_per_token
    # layers x K+V x heads x dim x bf16 x tokens
    assert m.declared() == [3 * 2 * 1 * 256 * 2 * CHUNK_TOKENS, 15 * 2 * 1 * 256 * 2 * 512]


@pytest.mark.parametrize("mix", HYBRID_MIXES)
def test_hybrid_churn_stays_within_the_waste_bound(mix, churn_models):
    """Full-layer chunks and window objects of hybrid models mixed with plain chunks: waste <= 5 % (default pool:
    variable pages, 4 KiB granule). A simulated 4 GiB arena, 600 requests, fixed seed."""
    from kdn.bench.tiers import churn

    row = churn(mix, arena_bytes=4 << 30, requests=600, seed=0, models=churn_models)
    assert row["waste_pct"] <= 5.0, row


def test_hybrid_churn_bound_catches_a_coarse_granule(churn_models):
    """The same churn with a 1 MiB granule rounds the small hybrid objects up and breaks the bound."""
    from kdn.bench.tiers import churn

    row = churn("+both hybrids", arena_bytes=4 << 30, requests=600, seed=0, granularity=1 << 20,
                models=churn_models)
    assert row["waste_pct"] > 5.0 and row["internal_pct"] > 2.0, row


def test_declared_sizes_above_the_page_bound_get_no_slab_class():
    """A window object far larger than arena / min_pages does not force huge pages on the other classes."""
    mib = 1 << 20
    sizes = [32 * mib + 4096, 13 * mib + 4096, 208 * mib + 4096]
    page = page_bytes_for(8 << 30, sizes, granularity=4096, min_pages=64)
    assert page <= (8 << 30) // 64
    alloc = TwoLevelAllocator(8 << 30, object_sizes=sizes)
    assert alloc.slot_sizes == sorted(sizes[:2])
    big = alloc.allocate(sizes[2])  # a variable extent spanning pages
    assert big is not None and alloc.page_kinds()[big // page] == "variable"
    # Only sizes above the bound declared: the page still fits the largest (a slab class per size, as before).
    assert page_bytes_for(1 << 30, [64 * mib], granularity=4096, min_pages=64) >= 64 * mib
