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
share of the arena not holding objects at the moments a put must evict, averaged.
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
from datetime import UTC, datetime
from typing import Any

__all__ = ["add_arguments", "run"]

MiB = 1 << 20
_TIERS = ("memory", "pinned", "gpu", "disk", "redis", "s3")
_COLUMNS = ["tier", "op", "gbps", "p50_ms", "p99_ms", "baseline", "base_gbps", "ratio"]
_ALLOC_COLUMNS = ["allocator", "waste_pct", "internal_pct", "stranded_pct", "evicted_per_put", "page_mib"]
LAYOUTS = {"llama-3-8b": (32, 131072), "qwen2.5-7b": (28, 57344), "smollm2-135m": (30, 23040)}  # layers, B/token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-mib", type=float, default=32.0, help="chunk payload in MiB (default 32)")
    parser.add_argument("--repeat", type=int, default=10, help="timed ops per tier and op (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed ops first (default 2)")
    parser.add_argument("--tiers", default=",".join(_TIERS), help=f"tiers to measure (default {','.join(_TIERS)})")
    parser.add_argument("--sections", default="tiers,allocator", help="tiers, allocator or both (default both)")
    parser.add_argument("--arena-gib", type=float, default=8.0, help="simulated pool for the allocator churn")
    parser.add_argument("--requests", type=int, default=1500, help="requests of the allocator churn")
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
def _workload(requests: int, seed: int) -> list[tuple[str, list[tuple[str, str, int]]]]:
    rng = random.Random(seed)
    done: list[list[tuple[str, str, int]]] = []
    ops = []
    for r in range(requests):
        if done and rng.random() < 0.6:
            ops.append(("touch", rng.choice(done)))
            continue
        model = rng.choices(list(LAYOUTS), [0.4, 0.3, 0.3])[0]
        layers, per_token = LAYOUTS[model]
        ratio = rng.uniform(3, 7) if rng.random() < 0.5 else 0.0
        n = 1 + int(rng.expovariate(1 / 7))
        objs = []
        for i in range(n + 1):
            raw = (256 if i < n else rng.randint(1, 255)) * per_token
            size = int(raw / (ratio * rng.uniform(0.85, 1.15))) if ratio else raw
            objs.append((f"{r}-{i}", model, size + 150 + 24 * layers))  # + the chunk header
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
    return {"waste_pct": 100 * statistics.fmean(waste), "internal_pct": 100 * statistics.fmean(internal),
            "stranded_pct": 100 * statistics.fmean(stranded), "evicted_per_put": evicted / put,
            "page_mib": alloc.page_bytes / MiB}


def _churn_naive(ops: list, arena: int) -> dict:
    """One fixed-slot LRU pool per layout (slot = a full raw chunk), the arena split by each layout's bytes."""
    demand = dict.fromkeys(LAYOUTS, 0)
    for op, objs in ops:
        for _, model, size in objs if op == "put" else ():
            demand[model] += size
    pools = {m: (int(arena * demand[m] / sum(demand.values())) // (256 * bpt + 150 + 24 * layers), {})
             for m, (layers, bpt) in LAYOUTS.items()}
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


def _allocator_rows(args: argparse.Namespace) -> list[dict]:
    from kdn.node.tiers.allocator import TwoLevelAllocator

    arena = int(args.arena_gib * (1 << 30))
    ops = _workload(args.requests, args.seed)
    chunks = [256 * bpt + 4096 for _, bpt in LAYOUTS.values()]  # full raw chunks + the header allowance
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
        row = _churn_naive(ops, arena) if make is None else _churn_pool(ops, make(), 1 if "LRU" in label else 64)
        rows.append({"allocator": label, **row})
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
        result["allocator"] = _allocator_rows(args)
        print(f"\nallocator churn: {args.arena_gib:g} GiB arena, {args.requests} requests, three layouts "
              f"(waste: arena share not holding objects when a put must evict)")
        print(format_table(result["allocator"], _ALLOC_COLUMNS))
    return result
