"""Load: N concurrent clients mixing lookups, stores and fetches against a controller and two nodes on loopback.

Servers are real processes (``python -m kdn controller`` / ``node``). Clients are threads spread over ``--procs``
worker processes, one :class:`~kdn.client.KDNClient` each, tenants assigned round-robin. Every operation picks a
prompt of its tenant from a Zipf(``--zipf``) mix over ``--prompts`` prompts of ``--chunks`` chunks (a lookup of a
32-chunk prompt counts 32 keys). The KV of a prompt is a function of (tenant, prompt), so a fetch that returns
anything else counts as a wrong hit (an error). Reports throughput and p50/p99/max latency per operation, errors,
lookup keys per second of controller CPU, and the RSS of every server sampled every ``--sample-s`` (growth is the
change over the last half of the run; > 10 % is flagged as a leak).

Goals (issue 21): 0 errors, RSS flat after warm-up, ≥ 20,000 chunk-key lookups/s per controller core, p99 ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kdn.bench import format_table

__all__ = ["add_arguments", "run", "LoadSpec", "rss_growth"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
OPS = ("lookup", "fetch", "store")


@dataclass
class LoadSpec:
    """One worker process's share of the load (picklable)."""

    controller: str
    clients: int
    first_client: int
    tenants: int
    prompts: int
    chunks: int
    chunk_size: int
    zipf: float
    mix: tuple[float, float, float]
    duration_s: float
    seed: int
    transport: str
    shared_memory: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--procs", type=int, default=2, help="worker processes the clients are spread over")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds excluded from the latency numbers")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=200, help="prompts per tenant")
    parser.add_argument("--chunks", type=int, default=32, help="chunks per prompt")
    parser.add_argument("--chunk-size", type=int, default=16, help="tokens per chunk")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the prompt mix")
    parser.add_argument("--mix", default="0.8,0.15,0.05", help="lookup,fetch,store shares (default 0.8,0.15,0.05)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period")
    parser.add_argument("--transport", default="bulk", choices=("bulk", "grpc"))
    parser.add_argument("--shared-memory", action="store_true", help="let clients map the nodes' memory tier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--node-memory", default="64MiB", help="memory tier of each node (small: chunks churn, "
                        "so RSS must stay flat once it is full)")
    parser.add_argument("--work-dir", help="server data/log directory (default: a temporary one)")
    parser.add_argument("--rebuild-chunks", type=int, default=0,
                        help="instead of the load: store this many chunks over the two nodes, kill -9 the "
                             "controller, restart it and time the index rebuild from the nodes' inventories "
                             "(issue 21: 30,000 chunks in <= 10 s, never a wrong location meanwhile)")
    parser.add_argument("--rebuild-heartbeat", type=float, default=2.0,
                        help="node heartbeat interval of the rebuild run (default 2.0 s, the shipped default)")
    parser.add_argument("--rebuild-repeat", type=int, default=3,
                        help="kills per code version, each at a random point of the heartbeat period")
    parser.add_argument("--baseline-repo", metavar="DIR",
                        help="also run the rebuild with the servers of another checkout (e.g. `git archive HEAD` "
                             "unpacked in a temporary directory), first, as the baseline of the same run")


# -- servers ---------------------------------------------------------------------------------------------------------
class _Server:
    """``python -m kdn ARGS`` on free loopback ports; reads the JSON ready line."""

    def __init__(self, args: list[str], log_path: Path, repo: Path = REPO) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        env.pop("KDN_CONFIG", None)
        self.log_path = log_path
        with open(log_path, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "kdn", *args], stdout=subprocess.PIPE, stderr=fh,
                                         stdin=subprocess.DEVNULL, env=env, cwd=repo)
        line, deadline = b"", time.monotonic() + 60
        while b"\n" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"kdn {args[0]} did not start: {log_path.read_text(errors='replace')[-2000:]}")
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line += os.read(self.proc.stdout.fileno(), 4096)
        self.ready = json.loads(line.split(b"\n")[0])

    def rss(self) -> int:
        """Resident set size in bytes (0 when the process is gone)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


_QUIET = ["--metrics-port", "-1", "--log-level", "WARNING"]


def _start_controller(work: Path, port: int = 0, repo: Path = REPO) -> _Server:
    return _Server(["controller", "--port", str(port), "--data-dir", str(work / "controller"), *_QUIET],
                   work / "controller.log", repo)


def _start_cluster(work: Path, node_memory: str, heartbeat_s: float = 0.5, repo: Path = REPO) -> dict[str, _Server]:
    servers = {"controller": _start_controller(work, repo=repo)}
    address = servers["controller"].ready["controller"]
    try:
        for name in ("node-a", "node-b"):
            servers[name] = _Server(["node", "--port", "0", "--bulk-port", "0", "--controller", address,
                                     "--node-id", name, "--data-dir", str(work / name), *_QUIET,
                                     "--set", f"node.tiers=[{{kind: memory, capacity: {node_memory}}}]",
                                     "--set", f"node.heartbeat_interval_s={heartbeat_s}"],
                                    work / f"{name}.log", repo)
    except BaseException:
        for server in servers.values():
            server.close()
        raise
    return servers


def rss_growth(samples: list[int]) -> float:
    """Relative RSS change over the last half of ``samples`` (mean of the last tenth vs the midpoint sample)."""
    if len(samples) < 4:
        return 0.0
    mid = samples[len(samples) // 2]
    tail = samples[-max(1, len(samples) // 10):]
    return (sum(tail) / len(tail)) / mid - 1.0 if mid else 0.0


# -- clients ---------------------------------------------------------------------------------------------------------
def _layout():
    from kdn.format.layout import KVLayout

    return KVLayout("kdn-load", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16")


def _prompt(tenant: int, prompt: int, tokens: int) -> list[int]:
    base = (tenant * 1_000_003 + prompt * 7919) % 50_000
    return [(base + i * 31) % 50_000 for i in range(tokens)]


def _kv(layout, tenant: int, prompt: int, tokens: int):
    """The canary KV of a prompt: a function of (tenant, prompt, position)."""
    import torch

    shape = layout.shape(tokens)
    pos = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1, 1)
    value = (pos * 0.001 + tenant * 0.1 + prompt * 0.0001) % 8.0
    return value.expand(shape).to(torch.float16).contiguous()


def _client_loop(spec: LoadSpec, index: int, stop_at: float, out: dict, lock: threading.Lock) -> None:
    import numpy as np
    import torch

    from kdn.client import KDNClient

    layout = _layout()
    tenant = index % spec.tenants
    rng = np.random.default_rng(spec.seed * 10_007 + index)
    ranks = np.arange(1, spec.prompts + 1, dtype=np.float64)
    weights = ranks ** -spec.zipf
    cdf = np.cumsum(weights / weights.sum())
    op_cdf = np.cumsum(spec.mix) / sum(spec.mix)
    tokens = spec.chunks * spec.chunk_size
    lat: dict[str, list[tuple[float, float]]] = {op: [] for op in OPS}
    errors: dict[str, int] = {}
    counts = {"keys": 0, "hit_keys": 0, "stored": 0, "fetched_tokens": 0, "wrong": 0}
    client = KDNClient(layout, controller=spec.controller, tenant=f"t{tenant}", chunk_size=spec.chunk_size,
                       timeout_s=10.0, transport=spec.transport, shared_memory=spec.shared_memory,
                       fetch_workers=2, bulk_streams=2, receive_pool_bytes=0, store_partial=False)
    try:
        while time.monotonic() < stop_at:
            prompt = int(np.searchsorted(cdf, rng.random()))
            op = OPS[int(np.searchsorted(op_cdf, rng.random()))]
            ids = _prompt(tenant, prompt, tokens)
            started = time.monotonic()
            try:
                if op == "lookup":
                    found = client.lookup(ids)
                    counts["keys"] += spec.chunks
                    counts["hit_keys"] += len(found.chunks)
                elif op == "store":
                    result = client.store(ids, _kv(layout, tenant, prompt, tokens)).result(30)
                    if result.failed:
                        raise RuntimeError(f"store failed: {result.error}")
                    counts["stored"] += result.stored
                else:
                    got = client.retrieve(ids)
                    if got.num_tokens:
                        want = _kv(layout, tenant, prompt, tokens)[:, :, :got.num_tokens]
                        if not torch.equal(got.kv, want):
                            counts["wrong"] += 1
                            raise RuntimeError("wrong hit: fetched KV differs from the stored canary")
                        counts["fetched_tokens"] += got.num_tokens
                lat[op].append((started, time.monotonic() - started))
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the load
                name = f"{op}: {type(exc).__name__}: {str(exc)[:120]}"
                errors[name] = errors.get(name, 0) + 1
    finally:
        client.close()
    with lock:
        for op in OPS:
            out["lat"][op].extend(lat[op])
        for name, n in errors.items():
            out["errors"][name] = out["errors"].get(name, 0) + n
        for name, n in counts.items():
            out["counts"][name] = out["counts"].get(name, 0) + n


def _worker(spec: LoadSpec, queue) -> None:
    """One worker process: ``spec.clients`` client threads until the deadline, results onto ``queue``."""
    logging.basicConfig(level=logging.ERROR)
    import torch

    torch.set_num_threads(1)
    out: dict = {"lat": {op: [] for op in OPS}, "errors": {}, "counts": {}}
    lock = threading.Lock()
    stop_at = time.monotonic() + spec.duration_s
    threads = [threading.Thread(target=_client_loop, args=(spec, spec.first_client + i, stop_at, out, lock),
                                daemon=True) for i in range(spec.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(spec.duration_s + 120)
    # wall-clock start times relative to the shared monotonic clock (same host, same clock)
    queue.put(out)


def _seed_prompts(address: str, args: argparse.Namespace) -> int:
    """Store the hottest tenth of each tenant's prompts so lookups and fetches hit from the start."""
    from kdn.client import KDNClient

    layout = _layout()
    tokens = args.chunks * args.chunk_size
    stored = 0
    for tenant in range(args.tenants):
        with KDNClient(layout, controller=address, tenant=f"t{tenant}", chunk_size=args.chunk_size,
                       receive_pool_bytes=0, store_partial=False, shared_memory=False) as client:
            deadline = time.monotonic() + 30
            while not client.refresh_nodes() or len(client.refresh_nodes()) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("nodes did not register")
                time.sleep(0.2)
            for prompt in range(max(1, args.prompts // 10)):
                stored += client.store(_prompt(tenant, prompt, tokens), _kv(layout, tenant, prompt, tokens)) \
                    .result(60).stored
    return stored


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict:
    if args.rebuild_chunks > 0:
        return run_rebuild(args)
    mix = tuple(float(x) for x in args.mix.split(","))
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise SystemExit("--mix takes three non-negative shares: lookup,fetch,store")
    procs = max(1, min(args.procs, args.clients))
    tmp = None if args.work_dir else tempfile.mkdtemp(prefix="kdn-load-")
    work = Path(args.work_dir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    servers = _start_cluster(work, args.node_memory)
    samples: dict[str, list[int]] = {name: [] for name in servers}
    sample_times: list[float] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(args.sample_s):
            sample_times.append(time.monotonic())
            for name, server in servers.items():
                samples[name].append(server.rss())

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        address = servers["controller"].ready["controller"]
        seeded = _seed_prompts(address, args)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        share = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
        specs = [LoadSpec(address, share[i], sum(share[:i]), args.tenants, args.prompts, args.chunks,
                          args.chunk_size, args.zipf, mix, args.duration, args.seed, args.transport,
                          args.shared_memory) for i in range(procs)]
        workers = [ctx.Process(target=_worker, args=(spec, queue), daemon=True) for spec in specs]
        sampler.start()
        for w in workers:
            w.start()
        cpu0 = {name: s.cpu_s() for name, s in servers.items()}
        t0 = time.monotonic()
        results = [queue.get(timeout=args.duration + 300) for _ in workers]
        wall = elapsed = time.monotonic() - t0
        cpu = {name: s.cpu_s() - cpu0[name] for name, s in servers.items()}
        for w in workers:
            w.join(30)
        alive = {name: s.proc.poll() is None for name, s in servers.items()}
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join(5)
        for server in servers.values():
            server.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    lat = {op: [] for op in OPS}
    errors: dict[str, int] = {}
    counts: dict[str, int] = {}
    for res in results:
        for op in OPS:
            lat[op].extend(res["lat"][op])
        for name, n in res["errors"].items():
            errors[name] = errors.get(name, 0) + n
        for name, n in res["counts"].items():
            counts[name] = counts.get(name, 0) + n
    # the load window: first operation to last completion (worker start-up excluded; one monotonic clock per host)
    start_all = min((t for op in OPS for t, _ in lat[op]), default=t0)
    elapsed = max((t + d for op in OPS for t, d in lat[op]), default=start_all + elapsed) - start_all
    measured = max(1e-9, elapsed - args.warmup)
    rows = []
    for op in OPS:
        kept = [d for t, d in lat[op] if t >= start_all + args.warmup]
        rows.append({"op": op, "ops": len(kept), "ops_per_s": len(kept) / measured,
                     "p50_ms": _pct(kept, 0.50) * 1e3, "p99_ms": _pct(kept, 0.99) * 1e3,
                     "max_ms": max(kept, default=0.0) * 1e3,
                     "errors": sum(n for name, n in errors.items() if name.startswith(op + ":"))})
    lookup_keys_s = counts.get("keys", 0) / max(elapsed, 1e-9)
    ctl_cores = cpu["controller"] / max(wall, 1e-9)
    window = [i for i, t in enumerate(sample_times) if start_all <= t <= start_all + elapsed]
    in_load = {name: [s[i] for i in window if i < len(s)] for name, s in samples.items()}
    rss_rows = [{"server": name, "rss_start_mib": (s[0] if s else 0) / 2**20,
                 "rss_mid_mib": (s[len(s) // 2] if s else 0) / 2**20, "rss_end_mib": (s[-1] if s else 0) / 2**20,
                 "growth_last_half": rss_growth(s), "cpu_cores": cpu[name] / max(wall, 1e-9),
                 "alive": alive[name]} for name, s in in_load.items()]
    summary = {
        "clients": args.clients, "procs": procs, "duration_s": elapsed, "tenants": args.tenants,
        "prompts_per_tenant": args.prompts, "chunks_per_prompt": args.chunks, "seeded_chunks": seeded,
        "errors": sum(errors.values()), "wrong_hits": counts.get("wrong", 0),
        "lookup_keys_per_s": lookup_keys_s, "lookup_key_hit_rate": counts.get("hit_keys", 0) / max(1, counts.get(
            "keys", 0)), "controller_cores": ctl_cores,
        "lookup_keys_per_controller_core_s": lookup_keys_s / ctl_cores if ctl_cores > 0 else 0.0,
        "leak": any(r["growth_last_half"] > 0.10 for r in rss_rows), "cpu_count": os.cpu_count(),
    }
    print(f"load: {args.clients} clients in {procs} processes, {args.tenants} tenants, {elapsed:.0f} s "
          f"({args.warmup:.0f} s warm-up excluded from latencies), {os.cpu_count()} cores")
    print(format_table(rows, ["op", "ops", "ops_per_s", "p50_ms", "p99_ms", "max_ms", "errors"]))
    print(format_table(rss_rows, ["server", "rss_start_mib", "rss_mid_mib", "rss_end_mib", "growth_last_half",
                                  "cpu_cores", "alive"]))
    print(json.dumps(summary))
    if errors:
        print("errors:", json.dumps(dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]), indent=1))
    return {"rows": rows, "rss": rss_rows, "rss_samples": {"t": [t - t0 for t in sample_times], **samples},
            "summary": summary, "errors": errors}


# -- controller restart: the index rebuilt from the nodes' inventories ---------------------------------------------
def _rebuild_layout():
    from kdn.format.layout import KVLayout

    return KVLayout("kdn-rebuild", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16")


def _fill(address: str, chunks: int, chunk_size: int, per_prompt: int = 500) -> list[str]:
    """Store ``chunks`` real chunk objects (prompts of ``per_prompt`` chunks); returns their keys."""
    import torch

    from kdn.client import KDNClient

    layout = _rebuild_layout()
    keys: list[str] = []
    with KDNClient(layout, controller=address, tenant="rebuild", chunk_size=chunk_size, receive_pool_bytes=0,
                   store_partial=False, shared_memory=False, timeout_s=60.0) as client:
        deadline = time.monotonic() + 30
        while len(client.refresh_nodes()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("nodes did not register")
            time.sleep(0.2)
        prompt = 0
        while len(keys) < chunks:
            n = min(per_prompt, chunks - len(keys))
            ids = [(prompt * 1_000_003 + i * 31) % 50_000 for i in range(n * chunk_size)]
            kv = torch.full(layout.shape(n * chunk_size), float(prompt % 100), dtype=torch.float16)
            result = client.store(ids, kv).result(300)
            if result.failed:
                raise RuntimeError(f"filling failed: {result.error}")
            keys += [str(k) for _, k in client.keys(ids)]
            prompt += 1
    return keys


def _holders(control, keys: list[str], batch: int = 20_000) -> dict[str, set[tuple[str, str]]]:
    """key -> {(node_id, address)} as the controller answers now."""
    out: dict[str, set[tuple[str, str]]] = {}
    for start in range(0, len(keys), batch):
        part = keys[start:start + batch]
        reply = control.call("Lookup", keys=part, prefix=False, probe=True)
        for key, result in zip(part, reply.results):
            out[key] = {(loc.node_id, loc.address) for loc in result.locations}
    return out


def run_rebuild(args: argparse.Namespace) -> dict:
    """Per code version (``--baseline-repo``, then this checkout): fill two nodes with ``--rebuild-chunks`` chunks,
    then ``--rebuild-repeat`` times ``kill -9`` the controller at a random point of the heartbeat period, restart it
    on its port and poll until its index is whole again. Every answer meanwhile is checked against the locations
    known before the kill (a location the controller names must be one that held the key)."""
    versions = ([("baseline", Path(args.baseline_repo).resolve())] if args.baseline_repo else []) + [("this", REPO)]
    rows = []
    for name, repo in versions:
        rows += _rebuild_version(args, name, repo)
    print(f"controller kill -9 + restart with {args.rebuild_chunks} chunks on two nodes, heartbeat "
          f"{args.rebuild_heartbeat} s ({os.cpu_count()} cores)")
    print(format_table(rows, ["code", "kill", "chunks", "restart_s", "first_entry_s", "rebuilt_s",
                              "index_after_ready_s", "polls", "wrong_locations", "differ_after"]))
    summary = {}
    for name, _ in versions:
        mine = [r["rebuilt_s"] for r in rows if r["code"] == name]
        summary[name] = {"rebuilt_s_max": max(mine), "rebuilt_s_mean": sum(mine) / len(mine),
                         "wrong_locations": sum(r["wrong_locations"] for r in rows if r["code"] == name)}
    print(json.dumps(summary))
    return {"rows": rows, "summary": summary}


def _rebuild_version(args: argparse.Namespace, code: str, repo: Path) -> list[dict]:
    import random

    from kdn.client.control import ControlClient

    tmp = None if args.work_dir else tempfile.mkdtemp(prefix="kdn-rebuild-")
    work = Path(args.work_dir or tmp) / code
    work.mkdir(parents=True, exist_ok=True)
    memory = max(args.node_memory, "512MiB", key=_parse_size)
    servers = _start_cluster(work, memory, heartbeat_s=args.rebuild_heartbeat, repo=repo)
    rng = random.Random(args.seed)
    rows = []
    try:
        address = servers["controller"].ready["controller"]
        t0 = time.monotonic()
        keys = _fill(address, args.rebuild_chunks, args.chunk_size)
        fill_s = time.monotonic() - t0
        control = ControlClient(address, timeout_s=5.0)
        try:
            before = _holders(control, keys)
            for kill in range(args.rebuild_repeat):
                time.sleep(rng.uniform(0, args.rebuild_heartbeat))  # a random phase of the nodes' heartbeats
                row = _kill_and_rebuild(servers, work, repo, control, keys, before, rng)
                rows.append({"code": code, "kill": kill + 1, "fill_s": fill_s, **row})
        finally:
            control.close()
    finally:
        for server in servers.values():
            server.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _kill_and_rebuild(servers: dict[str, _Server], work: Path, repo: Path, control, keys: list[str],
                      before: dict[str, set[tuple[str, str]]], rng) -> dict:
    from kdn.errors import KDNError

    indexed = control.call("Stats").keys
    port = int(servers["controller"].ready["controller"].rsplit(":", 1)[1])
    servers["controller"].proc.kill()  # kill -9
    servers["controller"].proc.wait(10)
    killed = time.monotonic()
    servers["controller"] = _start_controller(work, port, repo)
    ready = time.monotonic()
    polls = wrong = 0
    first_answer = full = None
    while time.monotonic() < ready + 120:
        sample = rng.sample(keys, min(2_000, len(keys)))
        try:
            now_held = _holders(control, sample)
            count = control.call("Stats").keys
        except KDNError:
            time.sleep(0.02)
            continue
        polls += 1
        wrong += sum(len(held - before[key]) for key, held in now_held.items())
        if count and first_answer is None:
            first_answer = time.monotonic()
        if count >= indexed:
            full = time.monotonic()
            break
        time.sleep(0.02)
    after = _holders(control, keys) if full is not None else {}
    return {"chunks": len(keys), "indexed_before": indexed,
            "unlocated_before": sum(1 for held in before.values() if not held), "restart_s": ready - killed,
            "first_entry_s": (first_answer - killed) if first_answer else float("nan"),
            "rebuilt_s": (full - killed) if full else float("nan"),
            "index_after_ready_s": (full - ready) if full else float("nan"), "polls": polls,
            "wrong_locations": wrong, "differ_after": sum(1 for k in keys if after.get(k) != before[k])}


def _parse_size(value: str) -> int:
    from kdn.config import parse_size

    return parse_size(value)
