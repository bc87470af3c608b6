"""The streaming controller (CacheGen, arXiv 2310.07240 §5): each chunk is stored at several levels, and a
retrieval picks, chunk by chunk, the least-compressed level that still meets the deadline.

- :class:`ThroughputEstimator`: per node, an EWMA of the recent transfers' bytes per second (a prior before the
  first one).
- :func:`choose_levels`: the pure planner. A chunk's cost at a level is its stored size over the node's estimated
  throughput plus its decode time (raw KV bytes over the level's measured decode rate). The deadline is the time a
  full prefill of the same tokens would take at the engine's measured prefill rate. A chunk is loaded while loading
  (at its fastest level) beats prefilling it; from the first chunk where even the smallest level loses, that chunk
  and all later ones are recomputed by the engine (``None`` in the plan). Loaded chunks get the least-compressed
  level that still meets the deadline (``objective="quality"``) or the fastest one (``"speed"``).
- :class:`MultiLevelClient`: one :class:`~kdn.client.kdn_client.KDNClient` per level (chunk keys carry the codec,
  so a level is a codec), a store at every level, and :meth:`MultiLevelClient.retrieve` that fetches in waves,
  re-estimating throughput and re-planning after each wave. A chunk planned as "recompute" (or missing, or damaged)
  ends the loaded prefix there: the engine prefills from there.

See docs/streaming.md.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from kdn.client.control import ControlClient
from kdn.client.kdn_client import KDNClient
from kdn.config import ClientConfig
from kdn.errors import AuthError, InvalidRequest, KDNError
from kdn.format.keys import ChunkKey, ChunkSpan
from kdn.format.layout import KVLayout

__all__ = ["ThroughputEstimator", "ChunkOption", "choose_levels", "chunk_seconds", "MultiLevelClient",
           "StreamResult", "SIZE_RATIOS", "DEFAULT_DECODE_RATES"]

log = logging.getLogger(__name__)

SIZE_RATIOS: dict[str, float] = {"raw": 1.0, "lz4": 1.0, "lossless": 1.51, "cachegen-high": 3.55,
                                 "cachegen-default": 6.06, "cachegen-compact": 10.76}
"""Stored size vs raw KV per level (docs/codec.md): the size estimate when the controller does not report one."""

DEFAULT_DECODE_RATES: dict[str, dict[str, float]] = {
    # raw KV bytes decoded per second, before :meth:`MultiLevelClient.calibrate` measures them (docs/codec.md)
    "cpu": {"raw": 2e9, "lz4": 1e9, "lossless": 0.2e9, "cachegen-high": 0.015e9, "cachegen-default": 0.015e9,
            "cachegen-compact": 0.015e9},
    "cuda": {"raw": 10e9, "lz4": 1e9, "lossless": 0.2e9, "cachegen-high": 17e9, "cachegen-default": 23e9,
             "cachegen-compact": 35e9},
}


class ThroughputEstimator:
    """Per-node throughput (bytes/s): an EWMA over recent transfers, ``prior`` before the first. Thread-safe."""

    def __init__(self, prior_bytes_per_s: float, alpha: float = 0.5) -> None:
        if prior_bytes_per_s <= 0:
            raise InvalidRequest("throughput prior must be positive")
        if not 0 < alpha <= 1:
            raise InvalidRequest("EWMA weight must be in (0, 1]")
        self.prior = float(prior_bytes_per_s)
        self.alpha = float(alpha)
        self._rates: dict[str, float] = {}
        self._samples: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe(self, node: str, nbytes: int, seconds: float) -> float:
        """Record a transfer of ``nbytes`` in ``seconds`` from ``node``; returns the new estimate. Empty or
        instantaneous transfers carry no information and are ignored."""
        with self._lock:
            if nbytes <= 0 or seconds <= 0:
                return self._rates.get(node, self.prior)
            rate = nbytes / seconds
            old = self._rates.get(node)
            self._rates[node] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old
            self._samples[node] = self._samples.get(node, 0) + 1
            return self._rates[node]

    def estimate(self, node: str) -> float:
        with self._lock:
            return self._rates.get(node, self.prior)

    def samples(self, node: str) -> int:
        with self._lock:
            return self._samples.get(node, 0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._rates)


@dataclass
class ChunkOption:
    """One cached chunk and the levels it is stored at."""

    span: ChunkSpan
    raw_bytes: int
    """Decoded KV bytes of the chunk (what decode produces)."""
    sizes: dict[str, int]
    """Level -> stored object size (bytes) for the levels that hold this chunk."""
    nodes: dict[str, str] = field(default_factory=dict)
    """Level -> id of the node it would be fetched from (first holder)."""
    keys: dict[str, ChunkKey] = field(default_factory=dict)
    """Level -> the chunk's key at that level."""

    @property
    def tokens(self) -> int:
        return self.span.num_tokens


def chunk_seconds(option: ChunkOption, level: str, throughput: Callable[[str], float],
                  decode_rates: Mapping[str, float]) -> float:
    """Estimated seconds to fetch and decode ``option`` at ``level``."""
    rate = throughput(option.nodes.get(level, ""))
    decode = decode_rates.get(level, 0.0)
    return option.sizes[level] / rate + (option.raw_bytes / decode if decode > 0 else 0.0)


def choose_levels(options: Sequence[ChunkOption], levels: Sequence[str], *, prefill_tokens_per_s: float,
                  throughput: Callable[[str], float], decode_rates: Mapping[str, float], elapsed_s: float = 0.0,
                  done_tokens: int = 0, objective: str = "quality") -> list[str | None]:
    """Per chunk the level to fetch it at, or ``None``: recompute (this chunk and every later one).

    ``levels`` are ordered least compressed first; ``done_tokens`` tokens were already loaded in ``elapsed_s``
    seconds of this request. ``prefill_tokens_per_s <= 0`` means no deadline: the least-compressed stored level.

    1. Load or recompute (marginal; time already spent is sunk): chunk ``i`` is loaded when, at the fastest level,
       chunks ``i..k`` load faster than the engine would prefill them, for some ``k >= i``; the first chunk where
       that fails, and every later one, is recomputed.
    2. Level of each loaded chunk: ``"quality"``, the least-compressed level at which this chunk and the rest of
       the loaded ones (at the same level, as in CacheGen) still finish within the prefill time of everything
       loaded (counted from the request's start); if none, the fastest. ``"speed"``: always the fastest.
    """
    if objective not in ("quality", "speed"):
        raise InvalidRequest(f"objective must be 'quality' or 'speed', got {objective!r}")
    n = len(options)
    if prefill_tokens_per_s <= 0:
        plan: list[str | None] = []
        for opt in options:
            avail = [lv for lv in levels if lv in opt.sizes]
            if not avail:
                break
            plan.append(avail[0])
        return plan + [None] * (n - len(plan))
    cost = {(i, lv): chunk_seconds(opt, lv, throughput, decode_rates)
            for i, opt in enumerate(options) for lv in levels if lv in opt.sizes}
    fastest = [min(((cost[i, lv], lv) for lv in levels if (i, lv) in cost), default=(float("inf"), None))
               for i in range(n)]
    prefill = [opt.tokens / prefill_tokens_per_s for opt in options]
    loaded = 0  # step 1: how many leading chunks are worth loading
    while loaded < n:
        run, fits = 0.0, False
        for k in range(loaded, n):
            run += fastest[k][0] - prefill[k]
            if run <= 0:
                fits = True
                break
        if not fits:
            break
        loaded += 1
    plan = [None] * n
    budget = (done_tokens + sum(o.tokens for o in options[:loaded])) / prefill_tokens_per_s
    spent = elapsed_s
    for i in range(loaded):
        chosen = fastest[i][1]
        if objective == "quality":
            for lv in levels:
                if (i, lv) not in cost:
                    continue
                rest = sum(cost.get((j, lv), fastest[j][0]) for j in range(i, loaded))
                if spent + rest <= budget:
                    chosen = lv
                    break
        plan[i] = chosen
        spent += cost[i, chosen]
    return plan


@dataclass
class StreamResult:
    num_tokens: int
    """Leading tokens whose KV was loaded."""
    kv: object | None
    """``[layers, 2, num_tokens, heads, dim]`` on the requested device, or ``None``."""
    levels: list[str] = field(default_factory=list)
    """The level of each loaded chunk, in order."""
    cached_tokens: int = 0
    """Leading tokens stored at some level (loaded + left to the engine to recompute)."""
    recompute_tokens: int = 0
    """Cached tokens the plan left to the engine (recompute was estimated faster than loading)."""
    bytes: int = 0
    seconds: float = 0.0
    deadline_s: float = 0.0
    """Prefill time of ``cached_tokens`` at the engine's rate (0: no deadline)."""
    waves: int = 0
    plans: list[list[str | None]] = field(default_factory=list)
    """The plan made before each wave (of the chunks still to load)."""


class MultiLevelClient:
    """Store each chunk at several levels; retrieve with the streaming controller's plan. Thread-safe for
    concurrent retrievals (they share the throughput estimate); call ``close()``."""

    def __init__(self, layout: KVLayout, config: ClientConfig | None = None, *, levels: Sequence[str] | None = None,
                 **overrides) -> None:
        config = copy.deepcopy(config or ClientConfig())
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise InvalidRequest(f"unknown client setting {name!r}")
            setattr(config, name, value)
        self.config = config
        self.layout = layout
        self.levels = list(levels or config.stream_levels)
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise InvalidRequest("stream levels must be a non-empty list without repeats")
        if config.stream_wave_chunks < 0:
            raise InvalidRequest("stream_wave_chunks must be >= 0 (0: one wave)")
        self.estimator = ThroughputEstimator(config.stream_prior_gbps * 1e9 / 8, config.stream_ewma)
        self.decode_rates: dict[str, dict[str, float]] = {d: dict(r) for d, r in DEFAULT_DECODE_RATES.items()}
        self.clients: dict[str, KDNClient] = {}
        try:
            for level in self.levels:
                cfg = copy.deepcopy(config)
                cfg.codec = level
                if not level.startswith("cachegen"):
                    cfg.codec_profile = ""  # a model profile is for the CacheGen levels only
                self.clients[level] = KDNClient(layout, cfg)
            # Sized lookups: the controller reports each location's object size, which KDNClient.lookup drops.
            self._control = ControlClient(config.controller, tls=config.tls, token=config.token,
                                          tenant=config.tenant, timeout_s=config.timeout_s)
        except BaseException:
            for client in self.clients.values():
                client.close()
            raise

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self._control.close()

    def __enter__(self) -> MultiLevelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- store ---------------------------------------------------------------------------------------------------
    def store(self, tokens, kv, *, levels: Sequence[str] | None = None, copy: bool = True) -> dict[str, Future]:
        """Queue ``kv`` of ``tokens`` for storage at every level (or ``levels``); one future per level."""
        chosen = list(levels or self.levels)
        unknown = [lv for lv in chosen if lv not in self.clients]
        if unknown:
            raise InvalidRequest(f"levels {unknown} are not configured (have {self.levels})")
        if not copy:
            return {lv: self.clients[lv].store(tokens, kv, copy=False) for lv in chosen}
        snapshot = kv.detach().clone()  # one snapshot shared by every level's encoder
        return {lv: self.clients[lv].store(tokens, snapshot, copy=False) for lv in chosen}

    def flush(self, timeout: float | None = None) -> bool:
        return all(client.flush(timeout) for client in self.clients.values())

    # -- planning ------------------------------------------------------------------------------------------------
    def decode_rates_for(self, device) -> dict[str, float]:
        return self.decode_rates["cuda" if str(device).startswith("cuda") else "cpu"]

    def calibrate(self, device="cpu", tokens: int | None = None, repeats: int = 2) -> dict[str, float]:
        """Measure each level's decode rate (raw KV bytes/s, verify included) on one random chunk on ``device``."""
        import torch

        from codec.raw import torch_dtype
        from kdn.format.chunk_codec import decode_chunk, encode_chunk

        n = tokens or self.config.chunk_size
        gen = torch.Generator().manual_seed(0)
        kv = (torch.randn(self.layout.shape(n), generator=gen) * 0.5).to(torch_dtype(self.layout.dtype))
        rates = self.decode_rates_for(device)
        cuda = str(device).startswith("cuda")
        for level, client in self.clients.items():
            data = encode_chunk(kv, key="calibrate", layout=self.layout, codec=client.codec,
                                layer_group=self.config.layer_group)
            decode_chunk(data, key="calibrate", layout=self.layout, codec=client.codec, device=device)  # warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                decode_chunk(data, key="calibrate", layout=self.layout, codec=client.codec, device=device)
            if cuda:
                torch.cuda.synchronize()
            rates[level] = self.layout.bytes_per_token * n * repeats / max(time.perf_counter() - t0, 1e-9)
        return dict(rates)

    def options(self, tokens, max_tokens: int | None = None) -> list[ChunkOption]:
        """The leading chunks of ``tokens`` stored at some level, with their sizes and holders (one controller
        call, a probe: it does not count as a use for placement). Empty when the controller is unreachable."""
        keyed = {lv: client.keys(tokens) for lv, client in self.clients.items()}
        spans = keyed[self.levels[0]]
        if max_tokens is not None:
            spans = [(s, k) for s, k in spans if s.end <= max_tokens]
        names = [str(keyed[lv][i][1]) for lv in self.levels for i in range(len(spans))]
        if not names:
            return []
        try:
            reply = self._control.call("Lookup", keys=names, prefix=False, probe=True)
        except AuthError:
            raise
        except KDNError as exc:
            log.warning("sized lookup failed (%s): a miss", exc)
            return []
        results = list(reply.results)
        out = []
        for i, (span, _) in enumerate(spans):
            raw = self.layout.bytes_per_token * span.num_tokens
            sizes, nodes, keys = {}, {}, {}
            for j, lv in enumerate(self.levels):
                r = j * len(spans) + i
                locations = list(results[r].locations) if r < len(results) else []
                if locations:
                    loc = locations[0]
                    sizes[lv] = int(loc.size) or int(raw / SIZE_RATIOS.get(lv, 1.0))
                    nodes[lv] = loc.node_id
                    keys[lv] = keyed[lv][i][1]
            if not sizes:
                break
            out.append(ChunkOption(span, raw, sizes, nodes, keys))
        return out

    def plan(self, options: Sequence[ChunkOption], *, device="cpu", elapsed_s: float = 0.0, done_tokens: int = 0,
             objective: str = "quality") -> list[str | None]:
        return choose_levels(options, self.levels, prefill_tokens_per_s=self.config.prefill_tokens_per_s,
                             throughput=self.estimator.estimate, decode_rates=self.decode_rates_for(device),
                             elapsed_s=elapsed_s, done_tokens=done_tokens, objective=objective)

    # -- retrieve ------------------------------------------------------------------------------------------------
    def retrieve(self, tokens, *, device="cpu", level: str | None = None, max_tokens: int | None = None,
                 objective: str = "quality") -> StreamResult:
        """Load the longest cached prefix of ``tokens`` as the controller plans it (``level``: every chunk at that
        one level, no recompute — the fixed-level baseline). Never raises for remote failures (a shorter prefix)."""
        import torch

        if level is not None and level not in self.clients:
            raise InvalidRequest(f"level {level!r} is not configured (have {self.levels})")
        t0 = time.perf_counter()
        options = self.options(tokens, max_tokens)
        rate = self.config.prefill_tokens_per_s
        cached = options[-1].span.end if options else 0
        result = StreamResult(0, None, cached_tokens=cached, deadline_s=cached / rate if rate > 0 else 0.0)
        pieces: list = []
        wave_size = self.config.stream_wave_chunks or len(options)
        i = 0
        while i < len(options):
            rest = options[i:]
            if level is not None:
                plan = [level if level in o.sizes else None for o in rest]
            else:
                plan = self.plan(rest, device=device, elapsed_s=time.perf_counter() - t0,
                                 done_tokens=rest[0].span.start, objective=objective)
            result.plans.append(plan)
            wave = []
            for chosen in plan[:wave_size]:
                if chosen is None:
                    break
                wave.append(chosen)
            if not wave:
                break
            loaded = self._fetch_wave(rest[:len(wave)], wave, device, result)
            pieces += loaded
            result.waves += 1
            i += len(loaded)
            if len(loaded) < len(wave):
                break  # a miss or a damaged chunk ends the prefix
        if pieces:
            result.kv = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
            result.num_tokens = options[len(pieces) - 1].span.end
        result.recompute_tokens = cached - result.num_tokens
        result.seconds = time.perf_counter() - t0
        return result

    def _fetch_wave(self, options: Sequence[ChunkOption], wave: Sequence[str], device, result: StreamResult) -> list:
        """Fetch one wave, one ``get_chunks`` call per (level, node); the leading chunks that arrived, in order."""
        rates = self.decode_rates_for(device)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (opt, lv) in enumerate(zip(options, wave)):
            groups.setdefault((lv, opt.nodes.get(lv, "")), []).append(i)
        got: list = [None] * len(options)
        for (lv, node), idx in groups.items():
            client = self.clients[lv]
            keys = [options[i].keys[lv] for i in idx]
            t0 = time.perf_counter()
            tensors = client.get_chunks(keys, device=device)
            if str(device).startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            arrived = [i for i, t in zip(idx, tensors) if t is not None]
            nbytes = sum(options[i].sizes[lv] for i in arrived)
            decode = sum(options[i].raw_bytes for i in arrived) / rates[lv] if rates.get(lv) else 0.0
            # the link's share of the time (decode estimated from the measured rate; never below a tenth)
            self.estimator.observe(node, nbytes, max(seconds - decode, 0.1 * seconds))
            result.bytes += nbytes
            for i, t in zip(idx, tensors):
                got[i] = t
        out = []
        for lv, t in zip(wave, got):
            if t is None:
                break
            out.append(t)
            result.levels.append(lv)
        return out
