"""The KDN client library: what engine connectors call.

``KDNClient(layout, config)`` is bound to a controller, a tenant, a layout and a codec:

- ``lookup(tokens)`` -> how many leading tokens are cached, and where each chunk lives.
- ``retrieve(tokens)`` -> the KV of the longest cached prefix as one tensor ``[layers, 2, tokens, kv_heads,
  head_dim]`` (the :mod:`kdn.format.layout` convention), fetched
  from whichever nodes hold the chunks, verified, decoded.
- ``store(tokens, kv)`` -> queue the KV of ``tokens`` for storage; returns at once (bounded queue; when full the
  job is dropped and counted, never blocking the engine).

Failures of the remote side (controller or nodes down, corrupt objects) never raise into the engine: they become
misses (fewer tokens retrieved) and are logged and counted. Bad arguments (wrong shape or dtype) raise
:class:`~kdn.errors.InvalidRequest`; a wrong token raises :class:`~kdn.errors.AuthError`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from codec.raw import torch_dtype
from kdn.client.control import ControlClient
from kdn.client.layer_stream import LayerStream, release_leases
from kdn.client.transport import NodeClient
from kdn.config import ClientConfig
from kdn.errors import AuthError, CorruptObject, InvalidRequest, KDNError
from kdn.format.chunk import ChunkHeader, verify_header, verify_object
from kdn.format.chunk_codec import check_kv, decode_chunk, encode_chunk, get_codec
from kdn.format.keys import ChunkKey, ChunkSpan, prefix_keys
from kdn.format.layout import KVLayout
from kdn.format.mac import load_keyring
from kdn.metrics import ClientMetrics
from kdn.wire.auth import call_metadata
from kdn.wire.recv_pool import Lease, ReceivePool
from kdn.wire.schedule import TransferScheduler
from kdn.wire.shm import is_shared

__all__ = ["KDNClient", "LookupResult", "ChunkHit", "RetrieveResult", "StoreResult", "LayerStream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeAddress:
    node_id: str
    address: str
    bulk_address: str = ""


@dataclass
class ChunkHit:
    span: ChunkSpan
    key: ChunkKey
    nodes: list[NodeAddress]


@dataclass
class LookupResult:
    hit_tokens: int
    """Leading tokens whose KV is cached."""
    chunks: list[ChunkHit] = field(default_factory=list)
    """The hit chunks, in order."""
    source: str = "controller"
    """``controller``, ``nodes`` (controller down, asked known nodes) or ``none``."""


@dataclass
class RetrieveResult:
    num_tokens: int
    kv: object | None
    """A tensor ``[layers, 2, num_tokens, kv_heads, head_dim]``, or ``None`` when nothing was retrieved."""
    chunks: int = 0
    bytes: int = 0


@dataclass
class StoreResult:
    stored: int = 0
    skipped: int = 0
    """Chunks that were already stored."""
    failed: int = 0
    dropped: bool = False
    error: str = ""


_BATCH_BYTES = 8 << 20
"""About this many bytes per bulk request of a fetch: the scheduler's preemption granularity."""


@dataclass(eq=False)
class _FetchRequest:
    """What one fetch still has to move (shared by its stripes) and when it must end."""

    remaining: int
    deadline: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def taken(self, nbytes: int) -> int:
        with self._lock:
            self.remaining = max(0, self.remaining - nbytes)
            return self.remaining


@dataclass(eq=False)
class _FetchJob:
    """One batch of chunks asked of one node; its receive buffers are its own until it is accepted or done."""

    part: list[int]
    started: float
    leases: list[Lease] = field(default_factory=list)
    hedged: bool = False
    """A race for this job's chunks was started."""
    hedge: bool = False
    """This job is itself a race (it bypasses the transfer scheduler: it is the way around a stuck slot)."""
    cancelled: bool = False
    """The fetch ended without it: send nothing more."""

    def release(self, pool: ReceivePool | None, keep: Sequence[object] = ()) -> list[Lease]:
        """Release the leases whose views are not in ``keep``; return the kept ones."""
        kept_ids = {id(v) for v in keep}
        kept = [lease for lease in self.leases if id(lease.view) in kept_ids]
        if pool is not None:
            for lease in self.leases:
                if id(lease.view) not in kept_ids:
                    pool.release(lease)
        self.leases = []
        return kept

class KDNClient:
    """Lookup, retrieve and store KV caches of one layout for one tenant. Thread-safe; call ``close()``."""

    def __init__(self, layout: KVLayout, config: ClientConfig | None = None, **overrides) -> None:
        config = config or ClientConfig()
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise InvalidRequest(f"unknown client setting {name!r}")
            setattr(config, name, value)
        self.config = config
        self.layout = layout
        self.fingerprint = layout.fingerprint()
        if config.chunk_size <= 0:
            raise InvalidRequest("chunk_size must be positive")
        self.metrics = ClientMetrics()
        self.metadata = call_metadata(config.token, config.tenant)
        self.keyring = load_keyring(config.security)
        if self.keyring is not None and self.keyring.holds_master:
            log.warning("this client holds the master MAC keyring and can sign every tenant's objects; give it only "
                        "its tenant's key file (kdnctl derive-key --tenant %s)", config.tenant)
        self._control = ControlClient(config.controller, tls=config.tls, token=config.token, tenant=config.tenant,
                                      timeout_s=config.timeout_s)
        try:  # may ask the controller for the codec's model profile
            self.codec = get_codec(config.codec, layout, **self._codec_options())
        except BaseException:
            self._control.close()
            raise
        self._nodes: dict[str, NodeAddress] = {}
        self._node_clients: dict[str, NodeClient] = {}
        self._lock = threading.Lock()
        # Twice the streams: hedged requests to a second holder find a free worker even when a node stalls.
        workers = 2 * max(1, config.fetch_workers, config.bulk_streams)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdn-fetch")
        self._recv_pool: ReceivePool | None = None
        # Concurrent fetches share the client's streams, shortest remaining first with aging (or FIFO).
        self._scheduler = TransferScheduler(config.transfer_policy, config.transfer_aging,
                                            slots=max(1, config.bulk_streams))
        self._rate = 0.0  # bytes/s of one stream, smoothed
        self._verify_pool = ThreadPoolExecutor(max_workers=max(1, config.bulk_streams), thread_name_prefix="kdn-verify")
        self._decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdn-decode")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, config.store_queue))
        self._store_thread = threading.Thread(target=self._store_loop, name="kdn-store", daemon=True)
        self._closed = False
        self._store_thread.start()

    # -- plumbing ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish queued stores (up to the deadline), then release connections."""
        if self._closed:
            return
        self.flush(self.config.timeout_s)
        self._closed = True
        self._queue.put(None)
        self._store_thread.join(timeout=self.config.timeout_s)
        self._pool.shutdown(wait=True)
        self._verify_pool.shutdown(wait=True)
        self._decode_pool.shutdown(wait=True)
        for client in self._node_clients.values():
            client.close()
        self._control.close()

    def __enter__(self) -> KDNClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _node(self, node: NodeAddress) -> NodeClient:
        with self._lock:
            self._nodes[node.node_id] = node
            client = self._node_clients.get(node.address)
            if client is None:
                client = NodeClient(node.address, node.bulk_address, tenant=self.config.tenant,
                                    token=self.config.token, timeout_s=self.config.timeout_s,
                                    transport=self.config.transport, tls=self.config.tls,
                                    shared_memory=self.config.shared_memory, bulk_streams=self.config.bulk_streams)
                self._node_clients[node.address] = client
            return client

    def _receive_pool(self) -> ReceivePool | None:
        """The receive pool (made on first use), or None when ``receive_pool_bytes`` is 0."""
        if self._recv_pool is None and self.config.receive_pool_bytes > 0:
            with self._lock:
                if self._recv_pool is None:
                    self._recv_pool = ReceivePool(self.config.receive_pool_bytes, pinned=self._pin_receive_pool())
        return self._recv_pool

    def _pin_receive_pool(self) -> bool:
        choice = str(self.config.receive_pool_pinned).strip().lower()
        if choice not in ("auto", "true", "false"):
            raise InvalidRequest(f"receive_pool_pinned must be auto, true or false, got {choice!r}")
        if choice != "auto":
            return choice == "true"
        import torch

        return torch.cuda.is_available()

    def _codec_options(self) -> dict:
        """``profile=`` for the codec: the configured file, else (``cachegen-*``) the controller's, cached on disk."""
        if self.config.codec_profile:
            return {"profile": self.config.codec_profile}
        if not self.config.codec.startswith("cachegen"):
            return {}
        from kdn.client.profiles import default_profile_cache, fetch_profile

        profile = fetch_profile(lambda **fields: self._control.call("GetProfile", **fields), self.fingerprint,
                                self.config.profile_cache or default_profile_cache())
        return {"profile": profile}

    def _call(self, method: str, **fields):
        return self._control.call(method, **fields)

    def keys(self, tokens, include_partial: bool | None = None) -> list[tuple[ChunkSpan, ChunkKey]]:
        """The prefix-chain keys of ``tokens`` under this client's tenant, layout and codec."""
        partial = self.config.store_partial if include_partial is None else include_partial
        return prefix_keys(tokens, self.config.tenant, self.fingerprint, self.codec.name, self.config.chunk_size,
                           include_partial=partial)

    def refresh_nodes(self) -> list[NodeAddress]:
        """Ask the controller for the live nodes (remembered for lookups while it is down)."""
        reply = self._call("ListNodes")
        nodes = [NodeAddress(n.node_id, n.address, n.bulk_address) for n in reply.nodes if n.alive]
        with self._lock:
            for n in nodes:
                self._nodes[n.node_id] = n
        return nodes

    # -- lookup --------------------------------------------------------------------------------------------------
    def lookup(self, tokens) -> LookupResult:
        """The longest cached prefix of ``tokens``. Never raises for remote failures (a miss instead)."""
        keyed = self.keys(tokens)
        self.metrics.lookup_tokens.inc(len(tokens))
        if not keyed:
            return LookupResult(0, [], "none")
        try:
            reply = self._call("Lookup", keys=[str(k) for _, k in keyed], prefix=True)
            hits = []
            for (span, key), result in zip(keyed, reply.results):
                nodes = [NodeAddress(loc.node_id, loc.address, loc.bulk_address) for loc in result.locations]
                if not nodes:
                    break
                hits.append(ChunkHit(span, key, nodes))
            return LookupResult(hits[-1].span.end if hits else 0, hits, "controller")
        except AuthError:
            raise
        except KDNError as exc:
            log.warning("controller lookup failed (%s); asking known nodes", exc)
            self.metrics.fallbacks.labels("controller").inc()
            return self._lookup_nodes(keyed)

    def _lookup_nodes(self, keyed: list[tuple[ChunkSpan, ChunkKey]]) -> LookupResult:
        with self._lock:
            nodes = list(self._nodes.values())
        present: dict[int, list[NodeAddress]] = {}
        names = [str(k) for _, k in keyed]
        for node in nodes:
            try:
                tiers = self._node(node).contains_many(names)
            except KDNError as exc:
                log.debug("node %s contains failed: %s", node.node_id, exc)
                continue
            for i, tier in enumerate(tiers):
                if tier:
                    present.setdefault(i, []).append(node)
        hits = []
        for i, (span, key) in enumerate(keyed):
            if i not in present:
                break
            hits.append(ChunkHit(span, key, present[i]))
        return LookupResult(hits[-1].span.end if hits else 0, hits, "nodes" if nodes else "none")

    # -- retrieve ------------------------------------------------------------------------------------------------
    def retrieve(self, tokens, *, device="cpu", max_tokens: int | None = None) -> RetrieveResult:
        """Fetch, verify and decode the longest cached prefix of ``tokens`` (at most ``max_tokens`` tokens).

        Chunks are fetched in parallel (each node's share striped over ``bulk_streams`` connections); a chunk that
        cannot be fetched from any holder or fails verification ends the prefix there. Never raises for remote
        failures.
        """
        stream = self.retrieve_layers(tokens, device=device, max_tokens=max_tokens)
        try:
            if stream.num_tokens == 0:
                return RetrieveResult(0, None)
            out = stream.empty()
            for layer_start, layer_end in stream.groups():
                stream.decode_group(layer_start, layer_end, out=out[layer_start:layer_end])
            return RetrieveResult(stream.num_tokens, out, chunks=len(stream.objects), bytes=stream.bytes)
        finally:
            stream.close()

    #: :meth:`retrieve_layers` can deliver layer-major (``layer_major=True``).
    streams_layers = True

    def retrieve_layers(self, tokens, *, device="cpu", max_tokens: int | None = None,
                        layer_major: bool = False) -> LayerStream:
        """Fetch and verify the longest cached prefix, then decode it layer group by layer group.

        By default every object is fetched and fully checksum-verified (in the fetching threads, as it arrives)
        before the first layer is handed out, so a consumer never receives layers of a prefix that later turns out
        to be damaged. Iterating the returned :class:`LayerStream` yields ``(layer_start, layer_end, kv)`` with
        ``kv`` of shape ``[layer_end - layer_start, 2, num_tokens, kv_heads, head_dim]``; decoding of the next group
        runs in a background thread while the caller uses the current one. Close the stream (or iterate it to the
        end) to give its receive buffers back.

        ``layer_major=True`` (for consumers that recompute when a layer cannot be delivered, like the Hugging Face
        connector's prefill): over the bulk channel, only the headers are read before returning; each layer group
        then arrives, verified, while the caller uses the earlier ones (:mod:`kdn.client.layer_fetch`), and
        ``decode_group`` waits for its group, raising :class:`~kdn.errors.KDNError` if it cannot be delivered
        intact from any holder. Same-host shared memory and gRPC-only nodes keep the whole-object path.
        """
        t0 = time.perf_counter()
        found = self.lookup(tokens)
        chunks = found.chunks
        if max_tokens is not None:
            chunks = [c for c in chunks if c.span.end <= max_tokens]
        if layer_major and chunks and not any(self._node(n).prefers_whole_objects(str(c.key))
                                              for c in chunks[:1] for n in c.nodes[:1]):
            return self._retrieve_layer_major(chunks, device, t0)
        leases: list[Lease] = []
        datas = self._fetch(chunks, leases) if chunks else []
        good: list[tuple[ChunkHit, object, ChunkHeader]] = []
        for chunk, data in zip(chunks, datas):
            header = self._header_claims(chunk, data) if data is not None else None
            if header is None:
                break
            good.append((chunk, data, header))
        num_tokens = good[-1][0].span.end if good else 0
        self.metrics.fetch_seconds.observe(time.perf_counter() - t0)
        self.metrics.hit_tokens.inc(num_tokens)
        return LayerStream(self, good, num_tokens, device, leases)

    def _retrieve_layer_major(self, chunks: Sequence[ChunkHit], device, t0: float) -> LayerStream:
        from kdn.client.layer_fetch import LayerArrival, open_prefix

        objects, leases, complete = open_prefix(self, chunks)
        num_tokens = objects[-1][0].span.end if objects else 0
        self.metrics.fetch_seconds.observe(time.perf_counter() - t0)  # headers only: the layers follow
        self.metrics.hit_tokens.inc(num_tokens)
        stream = LayerStream(self, objects, num_tokens, device, leases)
        if objects:
            stream.attach(LayerArrival(self, objects, stream.groups(), leases, complete).start())
        return stream

    def _header_claims(self, chunk: ChunkHit, data, whole: bool = True) -> ChunkHeader | None:
        """The header of ``data`` (a whole object whose payload was verified as it arrived, or with ``whole=False``
        just its header) if it is the object ``chunk`` asks for; None (logged, counted) otherwise."""
        try:
            header = (verify_object(data, key=str(chunk.key), fingerprint=self.fingerprint, codec=self.codec.name,
                                    check_payload=False, keyring=self.keyring) if whole else
                      verify_header(data, key=str(chunk.key), fingerprint=self.fingerprint, codec=self.codec.name,
                                    keyring=self.keyring))
            if header.num_layers != self.layout.num_layers or header.num_tokens != chunk.span.num_tokens:
                raise CorruptObject("object shape does not match its key")
            if bytes(header.codec_meta) != self.codec.meta():  # e.g. another CacheGen model profile
                raise CorruptObject("object was encoded with other codec parameters")
        except CorruptObject as exc:
            if whole:
                log.warning("chunk %s rejected: %s", chunk.key, exc)
                self.metrics.fallbacks.labels("corrupt").inc()
                return None
            raise
        return header

    def _fetch(self, chunks: Sequence[ChunkHit], leases: list[Lease] | None = None) -> list:
        """Fetch and verify objects from their holders; ``None`` where no holder could give an intact copy.

        Each node's share is striped over ``bulk_streams`` parallel requests. A request that fails is retried on the
        chunk's next holder; one still running after ``hedge_after_s`` is raced by a request to the next holder
        (the first intact copy wins), so a stalled node delays nothing that another node holds. With ``leases``,
        objects from the bulk channel land in the receive pool and the leases of the returned objects are appended
        (the caller releases them); a late request that loses a race frees its own buffers when it ends.
        """
        n = len(chunks)
        out: list = [None] * n
        tried = [0] * n  # holders asked so far, per chunk
        covering = [0] * n  # requests in flight that may still deliver the chunk
        pool = self._receive_pool() if leases is not None else None
        deadline = time.monotonic() + self.config.timeout_s
        hedge = self.config.hedge_after_s
        pending: dict[Future, _FetchJob] = {}
        request = _FetchRequest(sum(self._expected_bytes(c) for c in chunks), deadline)

        def launch(indices: list[int], hedge: bool = False) -> None:
            by_node: dict[str, tuple[NodeAddress, list[int]]] = {}
            for i in indices:
                if tried[i] < len(chunks[i].nodes):
                    node = chunks[i].nodes[tried[i]]
                    tried[i] += 1
                    by_node.setdefault(node.node_id, (node, []))[1].append(i)
            streams = max(1, self.config.bulk_streams)
            for node, share in by_node.values():
                per = -(-len(share) // streams)
                for j in range(0, len(share), per):
                    job = _FetchJob(share[j:j + per], time.monotonic(), hedge=hedge)
                    for i in job.part:
                        covering[i] += 1
                    fut = self._pool.submit(self._fetch_stripe, node, [chunks[i] for i in job.part],
                                            self._lease_into(pool, job) if pool is not None else None, job, request)
                    pending[fut] = job

        launch(list(range(n)))
        while pending:
            now = time.monotonic()
            wake = deadline
            if hedge > 0:
                wake = min([wake, *(j.started + hedge for j in pending.values() if not j.hedged)])
            done, _ = wait(list(pending), timeout=max(0.0, wake - now), return_when=FIRST_COMPLETED)
            retry: list[int] = []
            for fut in done:
                job = pending.pop(fut)
                datas = fut.result()
                accepted = []
                for i, data in zip(job.part, datas):
                    covering[i] -= 1
                    if data is not None and out[i] is None:
                        out[i] = data
                        accepted.append(data)
                    if out[i] is None and covering[i] == 0:
                        retry.append(i)
                kept = job.release(pool, accepted)
                if leases is not None:
                    leases.extend(kept)
            if retry:
                launch(retry)
            now = time.monotonic()
            if now >= deadline or all(d is not None for d in out):
                break
            if hedge > 0:
                for job in list(pending.values()):
                    if not job.hedged and now - job.started >= hedge:
                        job.hedged = True
                        late = [i for i in job.part if out[i] is None and tried[i] < len(chunks[i].nodes)]
                        if late:
                            self.metrics.fallbacks.labels("hedge").inc(len(late))
                            launch(late, hedge=True)
        for fut, job in pending.items():  # stragglers stop asking; their buffers go back when they end
            job.cancelled = True
            fut.add_done_callback(lambda _f, job=job: job.release(pool))
        return out

    def _expected_bytes(self, chunk: ChunkHit) -> int:
        """What a chunk's object should weigh (raw size: the scheduler only compares requests)."""
        return self.layout.bytes_per_token * max(1, chunk.span.num_tokens)

    def _fetch_stripe(self, node: NodeAddress, chunks: list[ChunkHit], alloc, job: _FetchJob,
                      request: _FetchRequest) -> list:
        """One stripe of a fetch: requests of about ``_BATCH_BYTES`` each, every one sent when the transfer
        scheduler gives this fetch a stream (a short fetch overtakes a long one at the next request). Races and
        requests of a cancelled fetch skip the scheduler / send nothing."""
        step = max(1, min(64, _BATCH_BYTES // max(1, self._expected_bytes(chunks[0]))))
        ticket = None if job.hedge else self._scheduler.submit(id(job), request.remaining)
        # FIFO keeps its stream for the whole stripe; SRPT gives it back after every request (the preemption point).
        preempt = self.config.transfer_policy != "fifo"
        held = False
        out: list = []
        try:
            for i in range(0, len(chunks), step):
                part = chunks[i:i + step]
                if job.cancelled:
                    out.append([None] * len(part))
                    continue
                if ticket is not None and not held:
                    if not self._scheduler.acquire(ticket, timeout=max(0.0, request.deadline - time.monotonic())):
                        out.append([None] * (len(chunks) - i))
                        break
                    held = True
                t0 = time.monotonic()
                try:
                    got = self._receive_from(node, part, alloc, request.remaining)
                finally:
                    if held and preempt:
                        self._scheduler.release(ticket)
                        held = False
                nbytes = sum(len(d) for d in got if d is not None)
                self._observe(nbytes, time.monotonic() - t0)
                if ticket is not None:
                    self._scheduler.update(ticket, request.taken(nbytes))
                # Verify this request's objects while the next one is received.
                out.append(self._verify_pool.submit(self._verify_from, node, part, got))
        finally:
            if ticket is not None:
                self._scheduler.done(ticket)
        return [data for item in out for data in (item if isinstance(item, list) else item.result())]

    def _observe(self, nbytes: int, seconds: float) -> None:
        """Feed the scheduler the streams' measured throughput (an average weighting recent requests)."""
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate
        self._scheduler.set_throughput(self._rate * max(1, self.config.bulk_streams))

    @staticmethod
    def _lease_into(pool: ReceivePool, job: _FetchJob):
        def alloc(size: int) -> memoryview:
            lease = pool.lease(size)
            job.leases.append(lease)
            return lease.view
        return alloc

    def _receive_from(self, node: NodeAddress, chunks: list[ChunkHit], alloc=None, job_bytes: int = 0) -> list:
        """Objects from one node as they arrived (not verified yet); ``None`` for misses and failures.
        ``job_bytes``: what the whole fetch still moves (the node sends fetches with less left first)."""
        try:
            return self._node(node).get_many([str(c.key) for c in chunks], alloc=alloc, job_bytes=job_bytes)
        except KDNError as exc:
            log.warning("fetch from node %s failed: %s", node.node_id, exc)
            self.metrics.fallbacks.labels("node").inc()
            return [None] * len(chunks)
        except Exception:  # noqa: BLE001 - a fetch never raises into the engine
            log.exception("fetch from node %s failed", node.node_id)
            return [None] * len(chunks)

    def _verify_from(self, node: NodeAddress, chunks: list[ChunkHit], datas: list) -> list:
        """Each object fully verified (hashing releases the GIL: this runs beside the receives)."""
        out = []
        for chunk, data in zip(chunks, datas):
            if data is not None:
                try:  # every path, shared memory included: a copy that does not verify is never handed out
                    verify_object(data, key=str(chunk.key), fingerprint=self.fingerprint, codec=self.codec.name,
                                  keyring=self.keyring)
                except CorruptObject as exc:
                    log.warning("node %s sent a bad object for %s: %s", node.node_id, chunk.key, exc)
                    self.metrics.fallbacks.labels("corrupt").inc()
                    data = None
                    self._node(node).report_bad([str(chunk.key)])  # async: the node drops it where listed
            out.append(data)
        return out

    # -- store ---------------------------------------------------------------------------------------------------
    def store(self, tokens, kv, *, copy: bool = True) -> Future:
        """Queue ``kv`` (``[layers, 2, len(tokens), heads, dim]``) of ``tokens`` for storage.

        Returns a future of :class:`StoreResult` at once. ``copy=False`` skips the snapshot copy when the caller
        guarantees not to modify ``kv`` until the future is done. Raises :class:`InvalidRequest` for a tensor
        that does not match the layout; remote failures only show in the result.
        """
        check_kv(kv, self.layout)
        toks = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if kv.shape[2] != len(toks):
            raise InvalidRequest(f"KV holds {kv.shape[2]} tokens but {len(toks)} tokens were given")
        future: Future = Future()
        if self._closed:
            raise InvalidRequest("client is closed")
        job = (toks, kv.detach().clone() if copy else kv.detach(), future)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.store_dropped.inc()
            future.set_result(StoreResult(dropped=True, error="store queue full"))
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued store has finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def _store_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                tokens, kv, future = job
                try:
                    result = self._store_now(tokens, kv)
                except Exception as exc:  # noqa: BLE001 - a store never raises into the engine
                    log.warning("store failed: %s", exc)
                    self.metrics.store_dropped.inc()
                    result = StoreResult(error=str(exc))
                future.set_result(result)
            finally:
                self._queue.task_done()

    def _store_now(self, tokens: list[int], kv) -> StoreResult:
        keyed = self.keys(tokens)
        if not keyed:
            return StoreResult()
        chunks = [(key, kv[:, :, span.start:span.end], span.start) for span, key in keyed]
        outcomes, error = self._put_chunks(chunks)
        result = StoreResult(stored=outcomes.count("stored"), skipped=outcomes.count("present"),
                             failed=outcomes.count("failed"), error=error)
        return result

    # -- keyed access (for connectors that name objects themselves: SGLang pages, CacheBlend content keys) -----
    def locate(self, keys: Sequence[ChunkKey], *, prefix: bool = False, probe: bool = False) -> list[list[NodeAddress]]:
        """Live locations of each key, from the controller. ``probe``: an existence check that does not count as
        a use for placement. Raises :class:`Unavailable` when the controller cannot be reached."""
        if not keys:
            return []
        reply = self._call("Lookup", keys=[str(k) for k in keys], prefix=prefix, probe=probe)
        found = [[NodeAddress(loc.node_id, loc.address, loc.bulk_address) for loc in r.locations]
                 for r in reply.results]
        return found + [[] for _ in range(len(keys) - len(found))]

    def get_chunks(self, keys: Sequence[ChunkKey], *, device="cpu", zero_copy: bool = False) -> list:
        """Fetch, verify and decode each object (``[layers, 2, tokens, heads, dim]``); ``None`` where missing or
        damaged. Never raises for remote failures.

        ``zero_copy``: ``raw`` objects read in place from a same-host node's shared memory come back as CPU
        tensors over the mapped arena (no copy, no re-hash: the node verified them at put; header, key, fingerprint
        and codec are checked). Each holds its object's lease until it is dropped. They are **read-only**: the
        mapping is ``PROT_READ``, so an in-place write would crash the process; copy them to modify. With a CUDA
        ``device`` the arena is registered with CUDA (once per mapping), so copies to the GPU run at the pinned
        rate. Other objects are decoded onto ``device`` as usual.
        """
        out: list = [None] * len(keys)
        try:
            found = self.locate(keys)
        except KDNError as exc:
            log.warning("lookup failed: %s", exc)
            return out
        hits = [i for i, nodes in enumerate(found) if nodes]
        chunks = [ChunkHit(ChunkSpan(i, 0, 0), keys[i], found[i]) for i in hits]
        leases: list[Lease] = []
        try:
            for i, chunk, data in zip(hits, chunks, self._fetch(chunks, leases)):
                if data is None:
                    continue
                try:
                    view = self._shared_view(data, str(chunk.key), device) if zero_copy else None
                    out[i] = view if view is not None else decode_chunk(data, key=str(chunk.key),
                                                                         layout=self.layout, codec=self.codec,
                                                                         device=device, keyring=self.keyring)
                except CorruptObject as exc:
                    log.warning("chunk %s rejected: %s", chunk.key, exc)
                    self.metrics.fallbacks.labels("corrupt").inc()
        finally:  # decoded tensors are copies: the receive buffers can be reused
            release_leases(self._recv_pool, leases, bool(self._recv_pool and self._recv_pool.pinned))
        return out

    def _shared_view(self, data, key: str, device):
        """A read-only CPU tensor over a ``raw`` object's KV in a mapped arena, or None (then decode a copy)."""
        import warnings

        import torch

        if self.codec.name != "raw" or not is_shared(data):
            return None
        header = verify_object(data, key=key, fingerprint=self.fingerprint, codec="raw", check_payload=False,
                               keyring=self.keyring)
        sections = header.sections
        nbytes = self.layout.bytes_per_token * header.num_tokens
        if header.num_layers != self.layout.num_layers or not sections or any(
                a.offset + a.length != b.offset for a, b in zip(sections, sections[1:])) or \
                sum(sec.length for sec in sections) != nbytes:
            raise CorruptObject("raw object's sections do not hold its KV back to back")
        dtype = torch_dtype(self.layout.dtype)
        mapping = data.obj.mapping
        start = data.obj.offset + sections[0].offset
        if start % torch.empty((), dtype=dtype).element_size():
            return None  # unaligned: a decoded copy instead
        if str(device).startswith("cuda"):
            mapping.tensor(cuda=True)  # register the arena once: GPU copies from it run at the pinned rate
        with warnings.catch_warnings():  # the mapping is read-only; the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(data[sections[0].offset:sections[0].offset + nbytes], dtype=torch.uint8)
        return raw.view(dtype).view(self.layout.shape(header.num_tokens))

    def put_chunks(self, chunks: Sequence[tuple[ChunkKey, object, int]]) -> list[bool]:
        """Store ``(key, kv, start)`` objects now (synchronously), skipping keys already stored; per chunk True
        when it is stored afterwards. Never raises for remote failures."""
        try:
            outcomes, _ = self._put_chunks(chunks)
        except KDNError as exc:
            log.warning("store failed: %s", exc)
            return [False] * len(chunks)
        return [o != "failed" for o in outcomes]

    def _put_chunks(self, chunks: Sequence[tuple[ChunkKey, object, int]]) -> tuple[list[str], str]:
        """Per chunk ``stored``, ``present`` or ``failed``, and the last error message."""
        names = [str(key) for key, _, _ in chunks]
        outcomes = ["present"] * len(chunks)
        missing = [i for i, nodes in enumerate(self.locate([k for k, _, _ in chunks], probe=True)) if not nodes]
        if not missing:
            return outcomes, ""
        on_device = self.codec.encodes_on_device

        def source(kv):  # one copy per chunk to the host, unless the codec encodes on the GPU
            return kv if on_device and kv.is_cuda else kv.cpu()

        objects = {i: encode_chunk(source(chunks[i][1]), key=names[i], layout=self.layout, codec=self.codec,
                                   keyring=self.keyring,
                                   start=chunks[i][2], layer_group=self.config.layer_group) for i in missing}
        placed = self._call(
            "Place", keys=[names[i] for i in missing], sizes=[len(objects[i]) for i in missing],
            tokens=[chunks[i][1].shape[2] for i in missing], starts=[chunks[i][2] for i in missing],
            model=self.layout.model_id, kv_bytes_per_token=self.layout.bytes_per_token)
        error = ""
        by_node: dict[tuple[str, str], tuple[NodeAddress, list[int]]] = {}
        for i, target in zip(missing, placed.targets):
            outcomes[i] = "failed"
            if target.node_id:
                node = NodeAddress(target.node_id, target.address, target.bulk_address)
                by_node.setdefault((node.node_id, target.tier), (node, []))[1].append(i)
            else:
                error = "the controller placed the chunk on no node (none registered yet, or none can hold it)"
        for (_, tier), (node, idx) in by_node.items():
            try:
                results = self._node(node).put_many_detailed([(names[i], objects[i]) for i in idx], tier=tier)
            except KDNError as exc:
                log.warning("store to node %s failed: %s", node.node_id, exc)
                error = str(exc)
                continue
            for i, (ok, err) in zip(idx, results):
                outcomes[i] = "stored" if ok else "failed"
                error = err or error
        self.metrics.stored_chunks.inc(outcomes.count("stored"))
        return outcomes, error
