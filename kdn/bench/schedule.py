"""Transfer scheduling on one busy link: shortest-remaining-first with aging vs FIFO (a simulation).

A deterministic discrete-event simulation (seeded): fetches arrive by Poisson at ``--load`` of a ``--link-gbps``
link, with heavy-tailed sizes (bounded Pareto, shape ``--alpha``, ``--min-mib`` to ``--max-mib``; or lognormal).
The arrival rate is set from the trace's own mean size, so the offered load is exactly ``--load``. Each fetch is a
sequence of ``--chunk-mib`` chunks; the real :class:`~kdn.wire.schedule.TransferScheduler` picks the job to serve
after every chunk (preemption at chunk granularity), on a simulated clock. Completion time = finish - arrival;
``big0.1%`` is the mean completion of the 0.1 % largest fetches (what aging protects). FIFO (the baseline) and
SRPT with each ``--agings`` λ run on the same trace; ratios are to FIFO's.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Sequence

from kdn.bench import format_table
from kdn.wire.schedule import DEFAULT_AGING, TransferScheduler

__all__ = ["add_arguments", "run", "simulate", "trace", "compare"]

MiB = 1 << 20
_COLUMNS = ["policy", "aging", "mean_ms", "p50_ms", "p99_ms", "max_ms", "big0.1%_ms", "mean_vs_fifo", "p99_vs_fifo",
            "big0.1%_vs_fifo", "goal"]
GOAL_MEAN, GOAL_P99 = 0.5, 1.2  # issue 19: mean <= 0.5x FIFO with p99 <= 1.2x FIFO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=20_000, help="fetches in the trace (default 20000)")
    parser.add_argument("--load", type=float, default=0.9, help="offered load: bytes arriving / link capacity")
    parser.add_argument("--link-gbps", type=float, default=10.0, help="link rate in Gbit/s (default 10)")
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="chunk size: the scheduling quantum (default 4)")
    parser.add_argument("--dist", choices=("pareto", "lognormal"), default="pareto", help="fetch size distribution")
    parser.add_argument("--alpha", type=float, default=1.1, help="bounded Pareto shape (default 1.1)")
    parser.add_argument("--min-mib", type=float, default=1.0, help="smallest fetch, Pareto (default 1 MiB)")
    parser.add_argument("--max-mib", type=float, default=4096.0, help="largest fetch, both (default 4 GiB)")
    parser.add_argument("--median-mib", type=float, default=8.0, help="lognormal median (default 8 MiB)")
    parser.add_argument("--sigma", type=float, default=2.0, help="lognormal sigma (default 2)")
    parser.add_argument("--agings", default="0,0.05,0.1,0.2,0.5,1,2",
                        help="comma-separated SRPT aging values λ to run")
    parser.add_argument("--seed", type=int, default=0)


def trace(jobs: int, load: float, link_bytes: float, *, dist: str = "pareto", alpha: float = 1.1,
          min_bytes: float = MiB, max_bytes: float = 4096 * MiB, median_bytes: float = 8 * MiB,
          sigma: float = 2.0, seed: int = 0) -> list[tuple[float, int]]:
    """(arrival s, size bytes) of ``jobs`` fetches; Poisson arrivals at ``load`` of the trace's own mean size."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(jobs):
        if dist == "pareto":  # inverse CDF of a Pareto(alpha) bounded to [min, max]
            u = rng.random()
            x = min_bytes / (1 - u * (1 - (min_bytes / max_bytes) ** alpha)) ** (1 / alpha)
        else:
            x = min(max_bytes, median_bytes * math.exp(rng.gauss(0.0, sigma)))
        sizes.append(max(1, int(x)))
    rate = load * link_bytes / statistics.fmean(sizes)  # arrivals per second
    t, out = 0.0, []
    for size in sizes:
        t += rng.expovariate(rate)
        out.append((t, size))
    return out


def simulate(jobs: Sequence[tuple[float, int]], policy: str, aging: float, link_bytes: float,
             chunk_bytes: int) -> list[float]:
    """Completion time (s) of each job on one link served chunk by chunk in the scheduler's order."""
    clock = [0.0]
    sched = TransferScheduler(policy, aging=aging, throughput=link_bytes, clock=lambda: clock[0])
    done = [math.nan] * len(jobs)
    now, i, n = 0.0, 0, len(jobs)

    def arrive_until(t: float) -> None:
        nonlocal i
        while i < n and jobs[i][0] <= t:
            clock[0] = jobs[i][0]  # the job's waiting time starts at its own arrival
            sched.submit(i, jobs[i][1])
            i += 1

    while i < n or len(sched):
        if not len(sched):
            now = max(now, jobs[i][0])  # idle link: jump to the next arrival
        arrive_until(now)
        job = sched.next()
        assert job is not None
        step = min(chunk_bytes, job.remaining)
        now += step / link_bytes
        arrive_until(now)  # arrivals during the chunk compete at the next chunk boundary
        if job.remaining == step:
            sched.done(job)
            done[job.job_id] = now - jobs[job.job_id][0]
        else:
            sched.update(job, job.remaining - step)
    return done


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def compare(jobs: Sequence[tuple[float, int]], agings: Sequence[float], link_bytes: float,
            chunk_bytes: int) -> list[dict]:
    """One row for FIFO and one per SRPT aging λ, with mean and p99 ratios to FIFO on the same trace."""
    big = sorted(range(len(jobs)), key=lambda j: jobs[j][1])[-max(1, len(jobs) // 1000):]  # the 0.1 % largest
    rows = []
    for policy, aging in [("fifo", None)] + [("srpt", a) for a in agings]:
        done = simulate(jobs, policy, aging or 0.0, link_bytes, chunk_bytes)
        times = sorted(done)
        rows.append({"policy": policy, "aging": aging, "mean_ms": 1e3 * statistics.fmean(times),
                     "p50_ms": 1e3 * _pct(times, 0.50), "p99_ms": 1e3 * _pct(times, 0.99),
                     "max_ms": 1e3 * times[-1], "big0.1%_ms": 1e3 * statistics.fmean(done[j] for j in big)})
    base = rows[0]
    for row in rows:
        for col in ("mean", "p99", "big0.1%"):
            row[f"{col}_vs_fifo"] = row[f"{col}_ms"] / base[f"{col}_ms"]
        met = row["mean_vs_fifo"] <= GOAL_MEAN and row["p99_vs_fifo"] <= GOAL_P99
        row["goal"] = "baseline" if row is base else ("met" if met else "no")
        if row["policy"] == "srpt" and row["aging"] == DEFAULT_AGING:
            row["policy"] = "srpt (default)"
    return rows


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    link = args.link_gbps * 1e9 / 8
    jobs = trace(args.jobs, args.load, link, dist=args.dist, alpha=args.alpha, min_bytes=args.min_mib * MiB,
                 max_bytes=args.max_mib * MiB, median_bytes=args.median_mib * MiB, sigma=args.sigma, seed=args.seed)
    agings = [float(a) for a in args.agings.split(",") if a.strip()]
    rows = compare(jobs, agings, link, max(1, int(args.chunk_mib * MiB)))
    sizes = sorted(s for _, s in jobs)
    span = jobs[-1][0]
    shape = (f"bounded Pareto alpha {args.alpha:g} in [{args.min_mib:g}, {args.max_mib:g}] MiB" if args.dist == "pareto"
             else f"lognormal median {args.median_mib:g} MiB sigma {args.sigma:g}")
    print(f"{args.jobs:,} fetches, {shape}: mean {statistics.fmean(sizes) / MiB:.1f} MiB, p50 "
          f"{_pct(sizes, 0.5) / MiB:.1f}, p99 {_pct(sizes, 0.99) / MiB:.0f}, max {sizes[-1] / MiB:.0f} MiB; Poisson "
          f"at load {args.load:g} of {args.link_gbps:g} Gbit/s over {span:.0f} s; {args.chunk_mib:g} MiB chunks, "
          f"seed {args.seed}")
    print(format_table([dict(r, aging="-" if r["aging"] is None else r["aging"]) for r in rows], _COLUMNS))
    print(f"completion = finish - arrival; ratios to FIFO on the same trace; goal: mean <= {GOAL_MEAN}x and p99 <= "
          f"{GOAL_P99}x FIFO; simulated in {time.perf_counter() - t0:.1f} s")
    params = {k: v for k, v in vars(args).items() if k not in ("func", "bench_module")}
    return {"rows": rows, "params": params, "default_aging": DEFAULT_AGING,
            "trace": {"jobs": len(jobs), "span_s": span, "mean_bytes": statistics.fmean(sizes),
                      "p50_bytes": _pct(sizes, 0.5), "p99_bytes": _pct(sizes, 0.99), "max_bytes": sizes[-1]}}
