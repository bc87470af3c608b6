"""Layer-major delivery: the objects of a cached prefix arrive layer group by layer group, so an engine computes
layer ``i`` while later layers are still on the wire.

:func:`open_prefix` reads every object's header first (one range request per node, each header verified:
checksum, and MAC with a keyring), then :class:`LayerArrival` requests, for each layer group in order, every
chunk's sections of that group as byte ranges (:meth:`kdn.wire.bulk_client.BulkClient.get_ranges`), striped over the
node's bulk connections and ordered by the client's transfer scheduler. Each range lands in its object's receive
buffer at its own offset and is verified (section checksum, or keyed digest) in the verify pool beside the next
receive. :meth:`LayerArrival.wait` returns once a group's sections of every chunk are verified.

No head-of-line blocking: a range that fails or does not verify, and one still missing ``hedge_after_s`` after the
consumer asked for its group, is fetched as a whole verified object from the chunk's next holder; a copy with a
byte-identical header (so identical section digests) is adopted for every group of that chunk. When no holder
gives one, the wait raises and the engine recomputes the prefix: a layer is never handed over unverified.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kdn.errors import CorruptObject, DeadlineExceeded, KDNError, Unavailable
from kdn.format.chunk import header_length, verify_section
from kdn.wire.recv_pool import Lease

if TYPE_CHECKING:
    from kdn.client.kdn_client import ChunkHit, KDNClient, NodeAddress

__all__ = ["LayerArrival", "open_prefix", "PROBE_BYTES"]

log = logging.getLogger(__name__)

PROBE_BYTES = 4096
"""Bytes read first from each object: its whole header in all but unusual cases (then a second read)."""


def open_prefix(client: KDNClient, chunks: Sequence[ChunkHit]) -> tuple[list, list[Lease], list[int]]:
    """The verified headers of ``chunks`` (from each chunk's first holder), each in a receive buffer of its
    object's size: ``(objects, leases, complete)`` with ``objects`` = ``[(chunk, buffer, header)]`` up to the first
    chunk without a good header, and ``complete`` the indices whose whole object is already there and verified
    (a header that could not be read from the first holder is replaced by a whole copy from another)."""
    heads: list = [None] * len(chunks)
    by_node: dict[str, tuple[NodeAddress, list[int]]] = {}
    for i, chunk in enumerate(chunks):
        by_node.setdefault(chunk.nodes[0].node_id, (chunk.nodes[0], []))[1].append(i)
    futures = [client._pool.submit(_read_headers, client, node, [chunks[i] for i in idx])
               for node, idx in by_node.values()]
    for (_, idx), fut in zip(by_node.values(), futures):
        for i, head in zip(idx, fut.result()):
            heads[i] = head
    pool = client._receive_pool()
    objects: list = []
    leases: list[Lease] = []
    complete: list[int] = []
    for i, chunk in enumerate(chunks):
        head = heads[i]
        if head is None:  # the first holder failed: a whole verified copy from any holder
            got: list[Lease] = []
            data = client._fetch([chunk], got)[0]
            leases += got
            header = client._header_claims(chunk, data) if data is not None else None
            if header is None:
                break
            objects.append((chunk, data, header))
            complete.append(i)
            continue
        raw, header = head
        if pool is not None:
            lease = pool.lease(header.total_len)
            leases.append(lease)
            buf = lease.view
        else:
            buf = memoryview(bytearray(header.total_len))
        buf[:header.header_len] = raw[:header.header_len]
        objects.append((chunk, buf, header))
    return objects, leases, complete


def _read_headers(client: KDNClient, node: NodeAddress, chunks: list[ChunkHit]) -> list:
    """``(bytes, header)`` per chunk from one node, ``None`` where it could not give a good header."""
    out: list = [None] * len(chunks)
    try:
        link = client._node(node)
        bufs = [memoryview(bytearray(PROBE_BYTES)) for _ in chunks]
        sizes = link.get_ranges([(str(c.key), 0, PROBE_BYTES) for c in chunks], bufs)
        longer = []
        for i, size in enumerate(sizes):
            try:
                need = header_length(bufs[i][:size]) if size >= 0 else 0
            except CorruptObject:
                continue  # parsed (and refused) below
            if need > size:
                longer.append(i)
                bufs[i] = memoryview(bytearray(need))
        if longer:  # unusually large headers (e.g. a big codec profile in the header): read them whole
            for i, size in zip(longer, link.get_ranges([(str(chunks[i].key), 0, len(bufs[i])) for i in longer],
                                                       [bufs[i] for i in longer])):
                sizes[i] = size
    except (KDNError, OSError) as exc:
        log.warning("header reads from node %s failed: %s", node.node_id, exc)
        return out
    for i, (chunk, buf, size) in enumerate(zip(chunks, bufs, sizes)):
        if size < 0:
            continue
        try:
            header = client._header_claims(chunk, buf[:size], whole=False)
        except CorruptObject as exc:
            log.warning("node %s sent a bad header for %s: %s", node.node_id, chunk.key, exc)
            client.metrics.fallbacks.labels("corrupt").inc()
            client._node(node).report_bad([str(chunk.key)])
            continue
        out[i] = (buf, header)
    return out


class LayerArrival:
    """The sections of a prefix's objects arriving group by group (see the module docstring). ``objects`` is
    shared with the :class:`~kdn.client.layer_stream.LayerStream` that decodes them: an adopted whole copy
    replaces its chunk's entry."""

    def __init__(self, client: KDNClient, objects: list, groups: list[tuple[int, int]], leases: list[Lease],
                 complete: Sequence[int] = ()) -> None:
        self.client = client
        self.objects = objects
        self.groups = groups
        self.leases = leases
        n = len(objects)
        self._ready = [[False] * n for _ in groups]
        self._missing = [n] * len(groups)
        self._cond = threading.Condition()
        self._adopted: set[int] = set()
        self._recovering: set[int] = set()
        self._failed: dict[int, str] = {}
        self._running = 0
        self._cancelled = False
        self._on_idle: Callable[[], None] | None = None
        self.started = time.monotonic()
        self.deadline = self.started + client.config.timeout_s
        self.ready_at: list[float] = [0.0] * len(groups)
        """When each group's last section was verified (``time.monotonic()``; 0 until then)."""
        for i in complete:
            self._adopt_locked(i)

    # -- consumer side -------------------------------------------------------------------------------------------
    def wait(self, layer_start: int, layer_end: int) -> None:
        """Block until every chunk's sections of layers ``[layer_start, layer_end)`` are here and verified.
        Raises :class:`Unavailable` when a chunk could not be delivered intact, :class:`DeadlineExceeded` past the
        client's timeout."""
        wanted = [g for g, (s, e) in enumerate(self.groups) if s < layer_end and e > layer_start]
        hedge_at = time.monotonic() + self.client.config.hedge_after_s if self.client.config.hedge_after_s > 0 \
            else float("inf")
        with self._cond:
            while True:
                late = [i for i in range(len(self.objects)) if any(not self._ready[g][i] for g in wanted)]
                if not late:
                    return
                lost = [i for i in late if i in self._failed]
                if lost:
                    raise Unavailable(f"layers [{layer_start}, {layer_end}) of chunk {lost[0]} of the cached prefix "
                                      f"could not be delivered: {self._failed[lost[0]]}")
                now = time.monotonic()
                if now >= self.deadline:
                    raise DeadlineExceeded(f"layers [{layer_start}, {layer_end}) of the cached prefix did not "
                                           f"arrive within {self.client.config.timeout_s} s")
                if now >= hedge_at:  # race the late chunks on their next holders
                    hedge_at = float("inf")
                    for i in late:
                        if i not in self._recovering and len(self.objects[i][0].nodes) > 1:
                            self.client.metrics.fallbacks.labels("hedge").inc()
                            self._recover_locked(i, "late", self.objects[i][0].nodes[0].node_id, same_node=False)
                self._cond.wait(timeout=max(0.001, min(hedge_at, self.deadline) - now))

    def close(self, release: Callable[[], None]) -> None:
        """Stop requesting; call ``release`` (give the receive buffers back) once no receive or check still
        touches them: now, or when the last one ends."""
        with self._cond:
            self._cancelled = True
            if self._running:
                self._on_idle = release
                return
        release()

    # -- fetching ------------------------------------------------------------------------------------------------
    def start(self) -> LayerArrival:
        """Launch each node's stripes: ``bulk_streams`` of them per node, each walking the groups in order."""
        client = self.client
        by_node: dict[str, tuple[NodeAddress, list[int]]] = {}
        for i, (chunk, _, _) in enumerate(self.objects):
            if i not in self._adopted:
                by_node.setdefault(chunk.nodes[0].node_id, (chunk.nodes[0], []))[1].append(i)
        remaining = sum(h.payload_len for i, (_, _, h) in enumerate(self.objects) if i not in self._adopted)
        from kdn.client.kdn_client import _FetchRequest

        request = _FetchRequest(remaining, self.deadline)
        streams = max(1, client.config.bulk_streams)
        for node, share in by_node.values():
            per = -(-len(share) // streams)
            for j in range(0, len(share), per):
                self._task(client._pool.submit, self._stripe, node, share[j:j + per], request)
        return self

    def _task(self, submit, fn, *args) -> None:
        """Run ``fn`` through ``submit``, counted as touching the buffers until it ends."""
        with self._cond:
            self._running += 1
        try:
            submit(fn, *args).add_done_callback(lambda _f: self._ended())
        except RuntimeError:  # the client is closing
            self._ended()

    def _ended(self) -> None:
        with self._cond:
            self._running -= 1
            release = self._on_idle if self._running == 0 else None
            if release is not None:
                self._on_idle = None
        if release is not None:
            release()

    def _stripe(self, node: NodeAddress, share: list[int], request) -> None:
        client = self.client
        ticket = client._scheduler.submit(id(share), request.remaining)
        preempt = client.config.transfer_policy != "fifo"
        held = False
        try:
            for g, (start, end) in enumerate(self.groups):
                with self._cond:
                    if self._cancelled:
                        return
                    todo = [i for i in share if not self._ready[g][i] and i not in self._recovering
                            and i not in self._failed and i not in self._adopted]
                if not todo:
                    continue
                ranges, into, spans = [], [], []
                for i in todo:
                    chunk, buf, header = self.objects[i]
                    sections = header.sections_for(start, end)
                    first, last = sections[0].offset, sections[-1].offset + sections[-1].length
                    ranges.append((str(chunk.key), first, last - first))
                    into.append(buf[first:last])
                    spans.append(last - first)
                if not held:
                    if not client._scheduler.acquire(ticket, timeout=max(0.0, self.deadline - time.monotonic())):
                        self._lost(share, "no transfer slot before the deadline", node)
                        return
                    held = True
                t0 = time.monotonic()
                try:
                    sizes = client._node(node).get_ranges(ranges, into, job_bytes=request.remaining)
                except Exception as exc:  # noqa: BLE001 - a failed node never stalls the others: next holder
                    log.warning("range reads from node %s failed: %s", node.node_id, exc)
                    client.metrics.fallbacks.labels("node").inc()
                    self._lost(share, f"node {node.node_id}: {exc}", node, same_node=True)
                    return
                finally:
                    if preempt:
                        client._scheduler.release(ticket)
                        held = False
                nbytes = sum(max(0, s) for s in sizes)
                client._observe(nbytes, time.monotonic() - t0)
                client._scheduler.update(ticket, request.taken(nbytes))
                self._task(client._verify_pool.submit, self._check, node, g, todo, sizes, spans)
        finally:
            if held:
                client._scheduler.release(ticket)
            client._scheduler.done(ticket)

    def _check(self, node: NodeAddress, g: int, todo: list[int], sizes: list[int], spans: list[int]) -> None:
        """Verify one request's sections of group ``g``; mark them ready or send their chunks elsewhere."""
        start, end = self.groups[g]
        for i, size, span in zip(todo, sizes, spans):
            chunk, buf, header = self.objects[i]
            if i in self._adopted:
                continue
            try:
                if size != span:  # a miss, or another object under this key: not this copy
                    raise Unavailable(f"node sent {size} of the {span} bytes of layers [{start}, {end})")
                for section in header.sections_for(start, end):
                    verify_section(buf, section, self.client.keyring)
            except (CorruptObject, Unavailable) as exc:
                log.warning("node %s sent bad sections of %s: %s", node.node_id, chunk.key, exc)
                if isinstance(exc, CorruptObject):
                    self.client.metrics.fallbacks.labels("corrupt").inc()
                    self.client._node(node).report_bad([str(chunk.key)])
                with self._cond:
                    self._recover_locked(i, str(exc), node.node_id, same_node=False)
                continue
            with self._cond:
                self._mark_locked(g, i)

    def _lost(self, share: list[int], why: str, node: NodeAddress, same_node: bool = False) -> None:
        with self._cond:
            for i in share:
                if i not in self._adopted and not all(self._ready[g][i] for g in range(len(self.groups))):
                    self._recover_locked(i, why, node.node_id, same_node=same_node)

    # -- recovery ------------------------------------------------------------------------------------------------
    def _recover_locked(self, i: int, why: str, skip: str, same_node: bool) -> None:
        """Fetch chunk ``i`` whole from its other holders (then from ``skip`` again when ``same_node``: e.g. over
        gRPC after its bulk channel dropped), in a thread of its own. Holds the condition."""
        if i in self._recovering or i in self._adopted or i in self._failed or self._cancelled:
            return
        chunk = self.objects[i][0]
        holders = [n for n in chunk.nodes if n.node_id != skip] + [n for n in chunk.nodes if n.node_id == skip][
            :int(same_node)]
        if not holders:
            self._failed[i] = why
            self._cond.notify_all()
            return
        self._recovering.add(i)
        self._running += 1
        threading.Thread(target=self._recover, args=(i, holders, why), name="kdn-layer-recover", daemon=True).start()

    def _recover(self, i: int, holders: list[NodeAddress], why: str) -> None:
        from kdn.client.kdn_client import ChunkHit

        try:
            chunk, buf, header = self.objects[i]
            got: list[Lease] = []
            data = self.client._fetch([ChunkHit(chunk.span, chunk.key, holders)], got)[0]
            same = data is not None and bytes(memoryview(data)[:header.header_len]) == bytes(buf[:header.header_len])
            with self._cond:
                self._recovering.discard(i)
                if same and not self._cancelled:
                    self.leases.extend(got)
                    self.objects[i] = (chunk, data, header)
                    self._adopt_locked(i)
                    return
                self._failed.setdefault(i, why if data is None else "the next holder's copy is another encoding")
                self._cond.notify_all()
            pool = self.client._recv_pool
            for lease in got:
                if pool is not None:
                    pool.release(lease)
        finally:
            self._ended()

    def _adopt_locked(self, i: int) -> None:
        self._adopted.add(i)
        for g in range(len(self.groups)):
            self._mark_locked(g, i)

    def _mark_locked(self, g: int, i: int) -> None:
        if not self._ready[g][i]:
            self._ready[g][i] = True
            self._missing[g] -= 1
            if not self._missing[g]:
                self.ready_at[g] = time.monotonic()
            self._cond.notify_all()
