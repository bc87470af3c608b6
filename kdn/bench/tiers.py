"""Tier throughput and latency against raw baselines, and the pool allocator's waste under churn.

Tiers section: put and get of real chunk objects (``--chunk-mib`` of payload in 32 layer sections, default 32 MiB:
a 256-token Llama-3-8B chunk), one object per call, each op timed in the same run next to its raw baseline on a
twin object of the same size (alternating which goes first): a numpy copy for memory and pinned, a page-locked
host-to-device (put) or device-to-host (get) copy for gpu, a plain file write+fsync / read on the same filesystem
for disk, a plain redis-py SET/GET on a redis-server started here for redis, a plain boto3 put_object/get_object
on a moto S3 server started here for s3. Pool tiers add ``lease`` rows: the zero-copy hit path (plus its
host-to-device copy for pinned, and a put from page-locked memory for gpu, on a CUDA machine). GB/s is the object
size over the p50.

Allocator section (pure logic, a simulated arena): a churn of chunk objects of three layouts (Llama-3-8B,
Qwen2.5-7B and SmolLM2-135M at 256 tokens: 32, 14 and 5.6 MiB raw), each request storing 1 + Exp(7) full chunks
and a final partial chunk, half of the requests raw and half compressed at a per-request ratio U(3, 7) with
+-15 % per chunk; 60 % of operations re-read an earlier request (its chunks become most recent). Waste is the
share of the arena not holding objects at the moments a put must evict, averaged. A second table mixes in hybrid
models (:data:`MIXES`): Gemma 3 270M and Gemma 2 2B stored as :class:`~kdn.client.HybridClient` does (1 + Exp(7)
full-layer chunk objects, no partial chunk, a window object at the last boundary and, for 30 % of requests, one at
an earlier boundary), object sizes from :class:`KVLayout` part layouts and real chunk headers; ``ratio`` is a
mix's waste over the all-full mix's, same allocator, same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["add_arguments", "run", "churn", "churn_models", "model_layouts", "MIXES"]

MiB = 1 << 20
_TIERS = ("memory", "pinned", "gpu", "disk", "redis", "s3")
_COLUMNS = ["tier", "op", "gbps", "p50_ms", "p99_ms", "baseline", "base_gbps", "ratio"]
_ALLOC_COLUMNS = ["allocator", "waste_pct", "internal_pct", "stranded_pct", "evicted_per_put", "page_mib"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-mib", type=float, default=32.0, help="chunk payload in MiB (default 32)")
    parser.add_argument("--repeat", type=int, default=10, help="timed ops per tier and op (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed ops first (default 2)")
    parser.add_argument("--tiers", default=",".join(_TIERS), help=f"tiers to measure (default {','.join(_TIERS)})")
    parser.add_argument("--sections", default="tiers,allocator", help="tiers, allocator or both (default both)")
    parser.add_argument("--arena-gib", type=float, default=8.0, help="simulated pool for the allocator churn")
    parser.add_argument("--requests", type=int, default=1500, help="requests of the allocator churn")
    parser.add_argument("--mixes", default=",".join(MIXES),
                        help=f"allocator churn mixes next to the all-full baseline (default {','.join(MIXES)})")
    parser.add_argument("--seed", type=int, default=0)


# -- tiers ---------------------------------------------------------------------------------------------------
def _objects(payload: int) -> Callable[[str], tuple[str, bytes]]:
    from kdn.format.chunk import build_object
    from kdn.format.keys import ChunkKey, KeyKind

    fingerprint = bytes(range(16))
    base = os.urandom(payload)
    step = payload // 32

    def make(name: str) -> tuple[str, bytes]:
        import hashlib

        key = str(ChunkKey("bench", fingerprint, "raw", KeyKind.PREFIX, hashlib.blake2b(name.encode(),
                                                                                       digest_size=20).digest()))
        sections = [(i, i + 1, base[i * step:(i + 1) * step if i < 31 else payload]) for i in range(32)]
        return key, build_object(codec="raw", key=key, fingerprint=fingerprint, num_tokens=256, start=0,
                                 num_layers=32, sections=sections)
    return make


def _cuda() -> Any:
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            return torch
    return None


def _dma(torch: Any, direction: str) -> Callable[[bytes], Callable[[], Any]]:
    """Baseline: a copy between page-locked host memory and the device ("h2d" or "d2h")."""
    def make(data: bytes) -> Callable[[], Any]:
        host = torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory()
        dev = torch.empty_like(host, device="cuda")
        src, dst = (host, dev) if direction == "h2d" else (dev, host)
        return lambda: (dst.copy_(src, non_blocking=True), torch.cuda.synchronize())
    return make


@contextlib.contextmanager
def _tier(name: str, capacity: int, workdir: str) -> Iterator[tuple[Any, dict[str, Callable], str]]:
    """(tier, {op: baseline(data) -> callable timed op}, note); tier None with a note when unavailable."""
    import numpy as np

    def memcpy(data: bytes) -> Callable[[], Any]:
        src = np.frombuffer(data, dtype=np.uint8)
        return lambda: src.copy()

    copies = {"put": ("memcpy", memcpy), "get": ("memcpy", memcpy)}
    if name == "memory":
        from kdn.node.tiers.memory import MemoryTier

        yield MemoryTier(capacity), copies, ""
    elif name == "pinned":
        from kdn.node.tiers.pinned import PinnedTier

        tier = PinnedTier(capacity)
        yield tier, copies, "" if tier.pinned else "pageable (no CUDA)"
        tier.close()
    elif name == "gpu":
        torch = _cuda()
        if torch is None:
            yield None, {}, "skipped: no CUDA"
            return
        from kdn.node.tiers.gpu import GPUTier

        tier = GPUTier(capacity)
        yield tier, {"put": ("pinned H2D", _dma(torch, "h2d")), "get": ("pinned D2H", _dma(torch, "d2h"))}, ""
        tier.close()
    elif name == "disk":
        from kdn.node.tiers.disk import DiskTier

        def write(data: bytes) -> Callable[[], Any]:
            path = os.path.join(workdir, f"plain-{time.perf_counter_ns()}")

            def op() -> None:
                with open(path, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            return op

        def read(data: bytes) -> Callable[[], Any]:
            path = os.path.join(workdir, f"plain-{time.perf_counter_ns()}")
            with open(path, "wb") as fh:
                fh.write(data)

            def op() -> bytes:
                with open(path, "rb") as fh:
                    return fh.read()
            return op

        tier = DiskTier(os.path.join(workdir, "disk"), capacity)
        yield tier, {"put": ("file write+fsync", write), "get": ("file read", read)}, "fsync: always"
        tier.close()
    elif name == "redis":
        yield from _redis(capacity, workdir)
    elif name == "s3":
        yield from _s3(capacity, workdir)


def _redis(capacity: int, workdir: str) -> Iterator[tuple[Any, dict, str]]:
    import shutil

    if shutil.which("redis-server") is None:
        yield None, {}, "skipped: redis-server not installed"
        return
    try:
        import redis

        from kdn.node.tiers.redis import RedisTier, RedisTierConfig
        from tests.servers import start_redis, stop
    except ImportError as exc:
        yield None, {}, f"skipped: {exc}"
        return
    proc, url = start_redis(workdir)
    client = redis.Redis.from_url(url)
    try:
        def plain(op: str) -> Callable[[bytes], Callable[[], Any]]:
            def make(data: bytes) -> Callable[[], Any]:
                key = f"plain-{time.perf_counter_ns()}"
                client.set(key, data)
                return (lambda: client.set(key, data)) if op == "put" else (lambda: client.get(key))
            return make

        tier = RedisTier(RedisTierConfig(url=url, capacity=capacity))
        yield tier, {"put": ("redis-py SET", plain("put")), "get": ("redis-py GET", plain("get"))}, ""
        tier.close()
    finally:
        client.close()
        stop(proc)


def _s3(capacity: int, workdir: str) -> Iterator[tuple[Any, dict, str]]:
    try:
        import boto3

        from kdn.node.tiers.s3 import S3Tier, S3TierConfig
        from tests.servers import start_moto, stop
    except ImportError as exc:
        yield None, {}, f"skipped: {exc}"
        return
    proc, url = start_moto(workdir)
    try:
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", **creds)
        client.create_bucket(Bucket="plain")

        def plain(op: str) -> Callable[[bytes], Callable[[], Any]]:
            def make(data: bytes) -> Callable[[], Any]:
                key = f"plain-{time.perf_counter_ns()}"
                client.put_object(Bucket="plain", Key=key, Body=data)
                if op == "put":
                    return lambda: client.put_object(Bucket="plain", Key=key, Body=data)
                return lambda: client.get_object(Bucket="plain", Key=key)["Body"].read()
            return make

        config = S3TierConfig(bucket="kdn-bench", endpoint_url=url, create_bucket=True, capacity=capacity,
                              access_key_id="testing", secret_access_key="testing")
        tier = S3Tier(config)
        yield tier, {"put": ("boto3 put_object", plain("put")), "get": ("boto3 get_object", plain("get"))}, ""
        tier.close()
    finally:
        stop(proc)


def _stats(name: str, op: str, size: int, ts: list[float], base: str, bs: list[float], note: str) -> dict:
    p50, base_p50 = statistics.median(ts), statistics.median(bs)
    p99 = sorted(ts)[min(len(ts) - 1, round(0.99 * (len(ts) - 1)))]
    return {"tier": name, "op": op, "gbps": size / p50 / 1e9, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
            "baseline": base, "base_gbps": size / base_p50 / 1e9, "ratio": base_p50 / p50, "note": note}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure(op: Callable[[str, bytes], Any], base_make: Callable[[bytes], Callable[[], Any]], objs: list,
             base_objs: list, warmup: int) -> tuple[list[float], list[float]]:
    """Time ``op`` on each object next to the baseline on a twin object (as cold), alternating which goes first."""
    ts, bs = [], []
    for i, ((key, obj), (_, twin)) in enumerate(zip(objs, base_objs)):
        base = base_make(twin)
        if i % 2:
            b, t = _timed(base), _timed(lambda k=key, o=obj: op(k, o))
        else:
            t, b = _timed(lambda k=key, o=obj: op(k, o)), _timed(base)
        if i >= warmup:
            ts.append(t)
            bs.append(b)
    return ts, bs


def _bench_tier(name: str, args: argparse.Namespace, make: Callable, workdir: str) -> tuple[list[dict], str]:
    n = args.warmup + args.repeat
    objs = [make(f"{name}-{i}") for i in range(n)]
    base_objs = [make(f"{name}-base-{i}") for i in range(n)]
    size = len(objs[0][1])
    with _tier(name, int(size * (2 * n + 2) * 1.25) + 64 * MiB, workdir) as (tier, baselines, note):
        if tier is None:
            return [], note
        ops: dict[str, Callable[[str, bytes], Any]] = {"put": tier.put, "get": lambda k, _o: tier.get(k)}
        runs = [(op, fn, *baselines[op]) for op, fn in ops.items()]
        if hasattr(tier, "lease"):
            runs.append(("lease", lambda k, _o: tier.lease(k).release(), *baselines["get"]))
            torch = _cuda()
            if name == "pinned" and torch is not None:
                def to_gpu(k: str, _o: bytes) -> None:
                    with tier.lease(k) as lease:
                        lease.tensor.to("cuda", non_blocking=True)
                        torch.cuda.synchronize()
                runs.append(("lease+H2D", to_gpu, "pinned H2D", _dma(torch, "h2d")))
            if name == "gpu" and torch is not None:  # a put whose source is page-locked (e.g. a pinned lease)
                srcs = {k: torch.frombuffer(bytearray(o), dtype=torch.uint8).pin_memory() for k, o in objs}
                runs.append(("put(pinned)", lambda k, _o: tier.put(k + "#p", srcs[k]), "pinned H2D",
                             _dma(torch, "h2d")))
        rows = []
        for op, fn, base_name, base_make in runs:
            ts, bs = _measure(fn, base_make, objs, base_objs, args.warmup)
            rows.append(_stats(name, op, size, ts, base_name, bs, note))
    return rows, note


# -- allocator churn -----------------------------------------------------------------------------------------
CHUNK_TOKENS = 256
#: Request shares of the models of each churn mix; ``all-full`` (the churn of the first table) is the baseline.
MIXES: dict[str, dict[str, float]] = {
    "all-full": {"llama-3-8b": 0.4, "qwen2.5-7b": 0.3, "smollm2-135m": 0.3},
    "+gemma-3-270m": {"llama-3-8b": 0.3, "qwen2.5-7b": 0.2, "smollm2-135m": 0.2, "gemma-3-270m": 0.3},
    "+gemma-2-2b": {"llama-3-8b": 0.3, "qwen2.5-7b": 0.2, "smollm2-135m": 0.2, "gemma-2-2b": 0.3},
    "+both hybrids": {"llama-3-8b": 0.25, "qwen2.5-7b": 0.15, "smollm2-135m": 0.15, "gemma-3-270m": 0.25,
                      "gemma-2-2b": 0.2},
    "hybrids only": {"gemma-3-270m": 0.5, "gemma-2-2b": 0.5},
}
#: Share of hybrid requests that also store a window at an earlier boundary (the divergence boundary).
SECOND_WINDOW = 0.3
_HYBRID_COLUMNS = ["mix", "allocator", "waste_pct", "internal_pct", "stranded_pct", "evicted_per_put", "page_mib",
                   "ratio"]
_OBJECT_COLUMNS = ["model", "object", "layers", "tokens", "raw_mib"]


def model_layouts() -> dict[str, Any]:
    """The churn's models as :class:`KVLayout` (KV shapes of their public configs); the two Gemmas are hybrid:
    Gemma 3 270M with a full-attention layer every sixth (3 of 18) and window 512, Gemma 2 2B alternating (13 of
    26) with window 4096."""
    from kdn.format.layout import FULL, SLIDING, KVLayout

    def every(n: int, k: int) -> tuple[str, ...]:  # every k-th layer full attention, the others sliding (Gemma)
        return tuple(FULL if (i + 1) % k == 0 else SLIDING for i in range(n))

    return {
        "llama-3-8b": KVLayout("meta-llama/Meta-Llama-3-8B", 32, 8, 128),
        "qwen2.5-7b": KVLayout("Qwen/Qwen2.5-7B", 28, 4, 128),
        "smollm2-135m": KVLayout("HuggingFaceTB/SmolLM2-135M", 30, 3, 64),
        "gemma-3-270m": KVLayout("google/gemma-3-270m", 18, 1, 256, layer_types=every(18, 6), sliding_window=512),
        "gemma-2-2b": KVLayout("google/gemma-2-2b", 26, 4, 256, layer_types=every(26, 2), sliding_window=4096),
    }


def _header_bytes(layout: Any, window: int = 0) -> int:
    """Header bytes of a raw chunk object of ``layout``: a real one-token object built by ``encode_chunk`` (under a
    window key when ``window``), less its payload. The raw codec's payload is the KV itself, so an object of ``t``
    tokens is ``header + t * bytes_per_token``."""
    import torch

    from codec.raw import torch_dtype
    from kdn.client.hybrid import window_key
    from kdn.format.chunk_codec import encode_chunk
    from kdn.format.keys import DIGEST_BYTES, ChunkKey, KeyKind

    key = ChunkKey("bench", layout.fingerprint(), "raw", KeyKind.PREFIX, bytes(DIGEST_BYTES))
    if window:
        key = window_key(key, layout.fingerprint(), window)
    kv = torch.zeros(layout.shape(1), dtype=torch_dtype(layout.dtype))
    return len(encode_chunk(kv, key=str(key), layout=layout, codec="raw")) - layout.bytes_per_token


@dataclass(frozen=True)
class ChurnModel:
    """The objects one model's stores make: chunk objects (of a hybrid: :class:`~kdn.client.HybridClient`'s full
    objects, its full-attention layers only) and, for a hybrid, window objects (its sliding layers, ``window``
    tokens at most)."""

    name: str
    chunk_layers: int
    chunk_bpt: int
    chunk_header: int
    window: int = 0
    window_layers: int = 0
    window_bpt: int = 0
    window_header: int = 0

    def declared(self) -> list[int]:
        """Raw bytes of the full-size object of each kind (what a pool tier's ``chunk_bytes`` declares)."""
        return [CHUNK_TOKENS * self.chunk_bpt] + ([self.window * self.window_bpt] if self.window else [])


def churn_models() -> dict[str, ChurnModel]:
    """:func:`model_layouts` as the object sizes the clients store (part layouts for hybrids)."""
    models = {}
    for name, layout in model_layouts().items():
        if layout.is_hybrid:
            full, sliding = layout.part_layout("full"), layout.part_layout("sliding")
            models[name] = ChurnModel(name, full.num_layers, full.bytes_per_token, _header_bytes(full),
                                      layout.sliding_window, sliding.num_layers, sliding.bytes_per_token,
                                      _header_bytes(sliding, layout.sliding_window))
        else:
            models[name] = ChurnModel(name, layout.num_layers, layout.bytes_per_token, _header_bytes(layout))
    return models


def _workload(requests: int, seed: int, mix: dict[str, float],
              models: dict[str, ChurnModel]) -> list[tuple[str, list[tuple[str, str, int]]]]:
    """The churn's operations: ``("put", objects)`` of one request or ``("touch", objects)`` of an earlier one."""
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    done: list[list[tuple[str, str, int]]] = []
    ops = []
    for r in range(requests):
        if done and rng.random() < 0.6:
            ops.append(("touch", rng.choice(done)))
            continue
        m = models[rng.choices(names, weights)[0]]
        ratio = rng.uniform(3, 7) if rng.random() < 0.5 else 0.0
        n = 1 + int(rng.expovariate(1 / 7))

        def size(payload: int, header: int, ratio: float = ratio) -> int:
            return header + (int(payload / (ratio * rng.uniform(0.85, 1.15))) if ratio else payload)

        objs = []
        if not m.window:  # n full chunks and a final partial one
            for i in range(n + 1):
                tokens = CHUNK_TOKENS if i < n else rng.randint(1, CHUNK_TOKENS - 1)
                objs.append((f"{r}-{i}", m.name, size(tokens * m.chunk_bpt, m.chunk_header)))
        else:  # HybridClient: n full objects (no partial chunk), then windows at the last (and divergence) boundary
            objs = [(f"{r}-{i}", m.name, size(CHUNK_TOKENS * m.chunk_bpt, m.chunk_header)) for i in range(n)]
            ends = {n} | ({rng.randint(1, n - 1)} if n > 1 and rng.random() < SECOND_WINDOW else set())
            for end in sorted(ends):
                tokens = min(m.window, end * CHUNK_TOKENS)
                objs.append((f"{r}-w{end}", f"{m.name}/window", size(tokens * m.window_bpt, m.window_header)))
        done.append(objs)
        ops.append(("put", objs))
    return ops


def _churn_pool(ops: list, alloc: Any, window: int) -> dict:
    from kdn.node.tiers.allocator import PoolIndex

    index = PoolIndex(alloc, victim_window=window)
    arena = alloc.arena_bytes
    waste, internal, stranded, evicted, put = [], [], [], 0, 0
    for op, objs in ops:
        for key, _, size in objs:
            if op == "touch":
                index.lookup(key)
                continue
            first = True

            def on_victim(victim: Any) -> None:
                nonlocal first, evicted
                if first:
                    first = False
                    s = alloc.stats()
                    waste.append(1 - index.used_bytes / arena)
                    internal.append(s.internal_bytes / arena)
                    stranded.append(s.stranded_bytes / arena)
                evicted += victim.size
            entry = index.reserve(key, size, on_victim)
            if entry is not None:
                index.publish(entry)
                put += size
    if not waste:
        raise ValueError("the churn never filled the arena: use more requests or a smaller arena")
    return {"waste_pct": 100 * statistics.fmean(waste), "internal_pct": 100 * statistics.fmean(internal),
            "stranded_pct": 100 * statistics.fmean(stranded), "evicted_per_put": evicted / put,
            "page_mib": alloc.page_bytes / MiB}


def _churn_naive(ops: list, arena: int, models: dict[str, ChurnModel]) -> dict:
    """One fixed-slot LRU pool per layout (slot = a full raw chunk), the arena split by each layout's bytes."""
    demand = dict.fromkeys(models, 0)
    for op, objs in ops:
        for _, model, size in objs if op == "put" else ():
            demand[model] += size
    pools = {m: (int(arena * d / sum(demand.values())) // (CHUNK_TOKENS * models[m].chunk_bpt
                                                          + models[m].chunk_header), {})
             for m, d in demand.items() if d}
    used, waste, evicted, put = 0, [], 0, 0
    for op, objs in ops:
        for key, model, size in objs:
            slots, lru = pools[model]
            if op == "touch":
                if key in lru:
                    lru[key] = lru.pop(key)
                continue
            if len(lru) >= slots:
                waste.append(1 - used / arena)
            while len(lru) >= slots:
                old = lru.pop(next(iter(lru)))
                used -= old
                evicted += old
            lru[key] = size
            used += size
            put += size
    return {"waste_pct": 100 * statistics.fmean(waste), "evicted_per_put": evicted / put}


def _declared(mix: str, models: dict[str, ChurnModel]) -> list[int]:
    from kdn.node.tiers.pinned import CHUNK_HEADER_ALLOWANCE

    return [c + CHUNK_HEADER_ALLOWANCE for name in MIXES[mix] for c in models[name].declared()]


def churn(mix: str, *, arena_bytes: int, requests: int, seed: int = 0, granularity: int = 4096,
          slabs: bool = False, models: dict[str, ChurnModel] | None = None) -> dict:
    """One two-level allocator's churn row for ``mix`` (a key of :data:`MIXES`): variable pages only (the pool
    tiers' default), or with ``slabs`` a slab class per declared full-size object of the mix's models."""
    from kdn.node.tiers.allocator import TwoLevelAllocator

    if mix not in MIXES:
        raise ValueError(f"unknown churn mix {mix!r}; known: {', '.join(MIXES)}")
    models = models or churn_models()
    sizes = _declared(mix, models) if slabs else []
    alloc = TwoLevelAllocator(arena_bytes, object_sizes=sizes, granularity=granularity)
    return _churn_pool(_workload(requests, seed, MIXES[mix], models), alloc, 64)


def _allocator_rows(args: argparse.Namespace, models: dict[str, ChurnModel]) -> list[dict]:
    from kdn.node.tiers.allocator import TwoLevelAllocator

    arena = int(args.arena_gib * (1 << 30))
    ops = _workload(args.requests, args.seed, MIXES["all-full"], models)
    chunks = _declared("all-full", models)  # full raw chunks + the header allowance
    hybrid = TwoLevelAllocator(arena, object_sizes=chunks)
    ladder = sorted({int(2 ** (e + k / 16)) for e in range(12, 30) for k in range(16)})
    variants = [
        ("naive per-layout pools", None),
        ("size classes (16/octave)", lambda: TwoLevelAllocator(arena, object_sizes=chunks + ladder,
                                                                page_bytes=hybrid.page_bytes)),
        ("two-level: slabs+variable", lambda: TwoLevelAllocator(arena, object_sizes=chunks)),
        ("two-level: variable only", lambda: TwoLevelAllocator(arena)),
        ("first-fit (one page, LRU)", lambda: TwoLevelAllocator(arena, page_bytes=arena)),
    ]
    rows = []
    for label, make in variants:
        if make is None:
            row = _churn_naive(ops, arena, models)
        else:
            row = _churn_pool(ops, make(), 1 if "LRU" in label else 64)
        rows.append({"allocator": label, **row})
    return rows


def _hybrid_rows(args: argparse.Namespace, models: dict[str, ChurnModel]) -> list[dict]:
    """Per mix and two-level variant, waste with ``ratio`` = waste / the all-full mix's (same variant, same run)."""
    arena = int(args.arena_gib * (1 << 30))
    mixes = ["all-full"] + [m.strip() for m in args.mixes.split(",") if m.strip() and m.strip() != "all-full"]
    rows, base = [], {}
    for mix in mixes:
        for label, slabs in (("two-level: variable only", False), ("two-level: slabs+variable", True)):
            row = churn(mix, arena_bytes=arena, requests=args.requests, seed=args.seed, slabs=slabs, models=models)
            base.setdefault(label, row["waste_pct"])
            rows.append({"mix": mix, "allocator": label, **row, "ratio": row["waste_pct"] / base[label]})
    return rows


def _object_rows(models: dict[str, ChurnModel]) -> list[dict]:
    rows = []
    for m in models.values():
        rows.append({"model": m.name, "object": "full-layer chunk" if m.window else "chunk",
                     "layers": m.chunk_layers, "tokens": CHUNK_TOKENS, "raw_mib": CHUNK_TOKENS * m.chunk_bpt / MiB})
        if m.window:
            rows.append({"model": m.name, "object": "window (at most)", "layers": m.window_layers,
                         "tokens": m.window, "raw_mib": m.window * m.window_bpt / MiB})
    return rows


def _hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    torch = _cuda()
    if torch is not None:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(args: argparse.Namespace) -> dict:
    from kdn.bench import format_table

    sections = {s.strip() for s in args.sections.split(",")}
    result: dict[str, Any] = {"rows": [], "notes": {}, "hardware": _hardware(),
                              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if "tiers" in sections:
        make = _objects(int(args.chunk_mib * MiB))
        with tempfile.TemporaryDirectory(prefix="kdn-bench-tiers-") as workdir:
            for name in [t.strip() for t in args.tiers.split(",") if t.strip()]:
                rows, note = _bench_tier(name, args, make, workdir)
                result["rows"] += rows
                if note:
                    result["notes"][name] = note
        print(f"tiers: {args.chunk_mib:g} MiB chunk objects, one per call, p50/p99 of {args.repeat} "
              f"(ratio: tier GB/s over its baseline's)")
        print(format_table(result["rows"], _COLUMNS))
        for name, note in result["notes"].items():
            print(f"  {name}: {note}")
    if "allocator" in sections:
        models = churn_models()
        result["allocator"] = _allocator_rows(args, models)
        print(f"\nallocator churn: {args.arena_gib:g} GiB arena, {args.requests} requests, three layouts "
              f"(waste: arena share not holding objects when a put must evict)")
        print(format_table(result["allocator"], _ALLOC_COLUMNS))
        result["allocator_objects"] = _object_rows(models)
        print("\nchurn objects (raw; half the requests compressed U(3, 7)x):")
        print(format_table(result["allocator_objects"], _OBJECT_COLUMNS))
        result["allocator_hybrid"] = _hybrid_rows(args, models)
        print("\nallocator churn with hybrid-model objects (ratio: waste over the all-full mix's, same allocator)")
        print(format_table(result["allocator_hybrid"], _HYBRID_COLUMNS))
    return result
