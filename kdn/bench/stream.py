"""The streaming controller over emulated links: each fixed level vs the adaptive controller vs full prefill.

One context (``--context`` tokens, batch 1) is prefilled by a real Hugging Face model to measure the engine's
prefill rate (the deadline: a full prefill of the cached tokens) and to get its real KV. For each link speed a
node (``kdn serve`` in a child process, memory tier, ``node.link_gbps`` = the speed) stores that KV at every level
(:class:`kdn.client.streaming.MultiLevelClient`, ``raw`` and the CacheGen levels), and a client on the same host
reads it over the paced bulk TCP channel (shared memory off). Paths per link, in turn, one warm-up round then
``--repeats`` timed rounds:

- ``full``: the full prefill (the baseline of the same run).
- one row per fixed level: every chunk at that level.
- ``adaptive``: the streaming controller, least-compressed level that meets the deadline (``objective=quality``),
  recomputing where even the smallest level loses to prefill.
- ``adaptive-fast``: the same controller choosing the fastest level (``objective=speed``).

TTFT-equivalent = load time (lookup, fetch, verify, decode onto the device) + the prefill time of the cached
tokens the plan left to the engine (at the measured rate); the uncached suffix costs every path the same and is
left out. A deadline miss is a request slower than full prefill. Quality per level is docs/codec.md's measured
table (SmolLM2-135M, top-1 agreement and perplexity change); a recomputed chunk is exact.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from kdn.bench import format_table

LEVELS = ["raw", "cachegen-high", "cachegen-default", "cachegen-compact"]
QUALITY = {  # docs/codec.md, "Quality" table: (top-1 agreement %, perplexity change %)
    "raw": (100.0, 0.0), "lz4": (100.0, 0.0), "lossless": (100.0, 0.0), "cachegen-high": (99.2, 0.04),
    "cachegen-default": (97.4, 0.28), "cachegen-compact": (91.1, 1.0),
}
COLUMNS = ["link_Gbps", "path", "ttft_ms", "load_ms", "speedup", "vs_best", "misses", "mean_level", "recompute_%",
           "MiB", "top1_%", "ppl_+%", "est_Gbps"]


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where KV is decoded and prefilled")
    parser.add_argument("--links", default="10,25,100", help="emulated link speeds in Gbit/s (comma list)")
    parser.add_argument("--context", type=int, help="cached tokens (default: cpu 1024, cuda 8192)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (median)")
    parser.add_argument("--model", default="auto", choices=["auto", "tiny-llama", "llama3-8b"],
                        help="random-weight model shape (auto: tiny-llama on cpu, llama3-8b on cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prefill-tokens-per-s", type=float, default=0.0,
                        help="the engine's prefill rate (default: measured with the model's forward)")
    parser.add_argument("--levels", default=",".join(LEVELS), help="stored levels, least compressed first")
    parser.add_argument("--wave-chunks", type=int, default=4, help="chunks fetched between re-plans (0: one wave)")
    parser.add_argument("--work-dir", help="where child nodes keep data (default: a temp dir)")


def _progress(text: str) -> None:
    print(f"[stream {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextmanager
def _env(**values: str):
    """Environment variables for a child process started inside the block (config: ``KDN_<SECTION>__<FIELD>``)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def run(args) -> dict:
    import torch

    from codec.profile import build_profile
    from connectors.hf import kv_from_cache, layout_for, prefill
    from kdn.bench.ttft import _build_model

    device = args.device
    cuda = device.startswith("cuda")
    context = args.context or (8192 if cuda else 1024)
    name = args.model if args.model != "auto" else ("llama3-8b" if cuda else "tiny-llama")
    links = [float(x) for x in args.links.split(",") if x.strip()]
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    notes: list[str] = []
    model, model_id = _build_model(name, device, args.dtype, context, notes)
    layout = layout_for(model, model_id=model_id)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    tokens = ids[0].tolist()

    _progress(f"measuring the prefill of {context} tokens ({model_id} on {device})")
    times = []
    for i in range(args.repeats + 1):
        _sync(cuda)
        t0 = time.perf_counter()
        out = prefill(model, ids, logits=False)
        _sync(cuda)
        if i:
            times.append(time.perf_counter() - t0)
    kv = kv_from_cache(out.cache)
    del out

    def full() -> None:
        prefill(model, ids, logits=False)
    measured_rate = context / statistics.median(times)
    rate = args.prefill_tokens_per_s or measured_rate
    notes.append(f"prefill measured {measured_rate:.0f} tokens/s ({1e3 * context / measured_rate:.1f} ms for "
                 f"{context} tokens)" + ("" if not args.prefill_tokens_per_s else f"; deadlines use {rate:.0f}"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdn-stream-"))
    profile = work / "cachegen.profile"
    work.mkdir(parents=True, exist_ok=True)
    # Statistics only (no Fisher importance): fine for timing and sizes; quality is docs/codec.md's measured table.
    build_profile([kv[:, :, :512].float().cpu()], model_id=layout.model_id).save(profile)
    kv_bytes = layout.bytes_per_token * context
    rows: list[dict] = []
    for gbps in links:
        rows += _link_rows(gbps, args, layout, tokens, kv, profile, work, rate, full, levels, kv_bytes, notes)
    _goal_notes(rows, links, levels, notes)
    title = (f"Streaming controller on {device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), {model_id} "
             f"{args.dtype}, {context} cached tokens ({kv_bytes / 2**20:.1f} MiB raw), chunk {args.chunk_size}, "
             f"deadline = that round's full prefill, median of {args.repeats}")
    print(title)
    print(format_table(rows, COLUMNS))
    for note in notes:
        print(f"note: {note}")
    return {"rows": rows, "title": title, "notes": notes, "device": device, "model": model_id,
            "prefill_tokens_per_s": rate}


def _link_rows(gbps, args, layout, tokens, kv, profile, work, rate, full, levels, kv_bytes, notes) -> list[dict]:
    from kdn.bench.ttft import _Server
    from kdn.client.streaming import MultiLevelClient

    cuda = args.device.startswith("cuda")
    cap = int(kv_bytes * 2.5) + (256 << 20)
    _progress(f"{gbps:g} Gbit/s: starting a node")
    with _env(KDN_NODE__LINK_GBPS=str(gbps)):
        server = _Server(work / f"link-{gbps:g}", f"[{{kind: memory, capacity: {cap}}}]")
    try:
        client = MultiLevelClient(layout, levels=levels, controller=server.address, chunk_size=args.chunk_size,
                                  codec_profile=str(profile), shared_memory=False, timeout_s=300.0,
                                  prefill_tokens_per_s=rate, stream_prior_gbps=gbps,
                                  stream_wave_chunks=args.wave_chunks)
        try:
            deadline = time.monotonic() + 30
            while not client.clients[levels[0]].refresh_nodes():
                if time.monotonic() > deadline:
                    raise RuntimeError("node did not register")
                time.sleep(0.2)
            rates = client.calibrate(args.device)
            if gbps == min(float(x) for x in args.links.split(",") if x.strip()):
                notes.append("decode rates (raw KV GB/s, verify included): " + ", ".join(
                    f"{lv} {r / 1e9:.3g}" for lv, r in rates.items() if lv in levels))
            _progress(f"{gbps:g} Gbit/s: storing {len(tokens)} tokens at {len(levels)} levels")
            for lv, fut in client.store(tokens, kv, copy=False).items():
                res = fut.result(900)
                if res.failed or res.error or res.dropped:
                    notes.append(f"{gbps:g} Gbit/s: store at {lv} incomplete ({res})"[:300])
            return _measure(client, gbps, args, tokens, rate, levels, cuda, full)
        finally:
            client.close()
    finally:
        server.close()


def _measure(client, gbps, args, tokens, rate, levels, cuda, full) -> list[dict]:
    """Rounds of every path; the full prefill runs in every round too and is that round's deadline (a noisy machine
    slows every path alike). The order rotates each round so that no path always follows the same one."""
    import gc

    paths = [("full", None)] + [(lv, {"level": lv}) for lv in levels]
    paths += [("adaptive", {"objective": "quality"}), ("adaptive-fast", {"objective": "speed"})]
    samples: dict[str, list[dict]] = {name: [] for name, _ in paths}
    context = len(tokens)
    for round_ in range(args.repeats + 1):
        order = paths[round_ % len(paths):] + paths[:round_ % len(paths)]
        got: dict[str, dict] = {}
        for name, kw in order:
            gc.collect()
            _sync(cuda)
            t0 = time.perf_counter()
            if kw is None:  # with --prefill-tokens-per-s the deadline is that rate's, not a measured prefill
                if not args.prefill_tokens_per_s:
                    full()
                    _sync(cuda)
                seconds = context / args.prefill_tokens_per_s if args.prefill_tokens_per_s else None
                got[name] = {"load": seconds or time.perf_counter() - t0, "levels": [], "tokens": 0,
                             "recompute": context, "bytes": 0, "chosen": []}
                continue
            res = client.retrieve(tokens, device=args.device, **kw)
            _sync(cuda)
            load = time.perf_counter() - t0
            got[name] = {"load": load, "levels": [levels.index(lv) for lv in res.levels], "tokens": res.num_tokens,
                         "recompute": res.recompute_tokens, "bytes": res.bytes, "chosen": res.levels}
            del res
        t_full = got["full"]["load"]
        for name, g in got.items():
            g["ttft"] = t_full if name == "full" else g["load"] + g["recompute"] * t_full / context
            g["miss"] = name != "full" and g["ttft"] > t_full
        _progress(f"{gbps:g} Gbit/s round {round_}: " + ", ".join(
            f"{n} {1e3 * g['ttft']:.1f} ms" + (f" ({g['recompute']} recomputed)" if g["recompute"] and n != "full"
                                              else "") for n, g in got.items()))
        if round_:
            for name, g in got.items():
                samples[name].append(g)
    node_rates = client.estimator.snapshot()
    est = max(node_rates.values()) * 8 / 1e9 if node_rates else 0.0
    medians = {name: statistics.median(s["ttft"] for s in v) for name, v in samples.items()}
    best = min(medians[lv] for lv in levels)
    rows = []
    for name, runs in samples.items():
        chosen = [lv for s in runs for lv in s["chosen"]]
        idx = [i for s in runs for i in s["levels"]]
        total = sum(s["tokens"] + s["recompute"] for s in runs) or 1
        # quality cost of the loaded chunks (equal-sized but the last), weighted by the share of loaded tokens;
        # recomputed tokens are exact
        loaded_share = sum(s["tokens"] for s in runs) / total
        top1 = 100.0 - loaded_share * (statistics.fmean(100.0 - QUALITY.get(lv, (100.0, 0.0))[0] for lv in chosen)
                                       if chosen else 0.0)
        ppl = loaded_share * (statistics.fmean(QUALITY.get(lv, (100.0, 0.0))[1] for lv in chosen) if chosen else 0.0)
        rows.append({
            "link_Gbps": gbps, "path": name, "ttft_ms": 1e3 * medians[name],
            "load_ms": "" if name == "full" else 1e3 * statistics.median(s["load"] for s in runs),
            "speedup": medians["full"] / medians[name], "vs_best": "" if name == "full" else best / medians[name],
            "misses": "" if name == "full" else f"{sum(s['miss'] for s in runs)}/{len(runs)}",
            "mean_level": statistics.fmean(idx) if idx else "",
            "recompute_%": 100.0 * sum(s["recompute"] for s in runs) / total,
            "MiB": statistics.median(s["bytes"] for s in runs) / 2**20, "top1_%": top1, "ppl_+%": ppl,
            "est_Gbps": est if name.startswith("adaptive") else ""})
    return rows


def _goal_notes(rows: list[dict], links: list[float], levels: list[str], notes: list[str]) -> None:
    """Issue 19's goals, checked on this run's rows."""
    def misses(row) -> int:
        return int(str(row["misses"]).split("/")[0] or 0)

    by = {(r["link_Gbps"], r["path"]): r for r in rows}
    for path in ("adaptive", "adaptive-fast"):
        parts = []
        for g in links:
            r = by.get((g, path))
            if r is None:
                continue
            parts.append(f"{g:g} Gbit/s {r['speedup']:.2f}x of full (goal >= 1.0), {r['vs_best']:.2f} of the best "
                         f"fixed level (goal >= 0.95)")
        total = sum(misses(by[(g, path)]) for g in links if (g, path) in by)
        fixed = {lv: sum(misses(by[(g, lv)]) for g in links if (g, lv) in by) for lv in levels}
        fewer = all(total < m for m in fixed.values())
        parts.append(f"deadline misses {total} vs fixed {fixed} (goal: fewer than every fixed level: "
                     f"{'met' if fewer else 'not met'})")
        notes.append(f"{path}: " + "; ".join(parts))
    notes.append("mean_level: " + ", ".join(f"{i} = {lv}" for i, lv in enumerate(levels))
                 + "; quality cost per level from docs/codec.md (SmolLM2-135M), recomputed tokens exact")
