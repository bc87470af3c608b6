"""The verified objects of one retrieved prefix, decoded layer group by layer group (:class:`LayerStream`), and the
hand-back of their receive buffers."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from codec.raw import torch_dtype
from kdn.errors import InvalidRequest
from kdn.format.chunk_codec import codec_errors
from kdn.wire.recv_pool import Lease, ReceivePool

if TYPE_CHECKING:
    from kdn.client.kdn_client import KDNClient

__all__ = ["LayerStream", "release_leases"]


class LayerStream:
    """Verified objects of a cached prefix, decoded layer group by layer group on iteration.

    Objects that came over the network may sit in the client's receive pool: ``close()`` (called at the end of
    iteration, by :meth:`KDNClient.retrieve`, or when the stream is garbage-collected) hands that memory back, so
    decode what you need before closing. ``writes_device``: every object is ``raw`` in page-locked memory, so a
    layer loader may pass GPU ``out`` tensors to :meth:`decode_group` (copies at DMA rate, no host staging).
    """

    def __init__(self, client: KDNClient, objects: list, num_tokens: int, device,
                 leases: Sequence[Lease] = ()) -> None:
        self.client = client
        self.objects = objects
        self.num_tokens = num_tokens
        self.device = device
        self.bytes = sum(len(data) for _, data, _ in objects)
        pool = client._recv_pool
        pinned = bool(leases) and pool is not None and pool.pinned
        self.writes_device = (pinned and client.codec.name == "raw" and bool(objects)
                              and len(leases) >= len(objects))
        self._leases = leases
        self._pinned = pinned
        self.arrival = None
        self._finalizer = weakref.finalize(self, release_leases, pool, list(leases), pinned)

    def attach(self, arrival) -> None:
        """Deliver layer-major: ``arrival`` (a :class:`~kdn.client.layer_fetch.LayerArrival`) is still receiving
        the objects' sections; :meth:`decode_group` waits for its group, and closing waits for no receive to touch
        the buffers any more before handing them back (including copies adopted later)."""
        self.arrival = arrival
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _close_arrival, arrival, self.client._recv_pool, self._leases,
                                           self._pinned)

    def close(self) -> None:
        """Give the objects' receive buffers back to the client's pool (idempotent)."""
        self._finalizer()

    def empty(self):
        """An uninitialized tensor of the whole prefix's KV shape."""
        import torch

        layout = self.client.layout
        return torch.empty(layout.shape(self.num_tokens), dtype=torch_dtype(layout.dtype), device=self.device)

    def groups(self) -> list[tuple[int, int]]:
        """The layer groups every object shares: the finest split whose boundaries are section boundaries of every
        object (objects stored with different ``layer_group`` settings still decode together)."""
        if not self.objects:
            return []
        cuts: set[int] | None = None
        for _, _, header in self.objects:
            ends = {s.layer_end for s in header.sections}
            cuts = ends if cuts is None else cuts & ends
        bounds = [0, *sorted(cuts or ())]
        return list(zip(bounds, bounds[1:]))

    def decode_group(self, layer_start: int, layer_end: int, out=None):
        """Decode layers ``[layer_start, layer_end)`` of every object into one tensor (``out`` if given)."""
        import torch

        client = self.client
        layout = client.layout
        if self.arrival is not None:
            self.arrival.wait(layer_start, layer_end)
        if out is None:
            out = torch.empty(layout.shape(self.num_tokens, layer_end - layer_start),
                              dtype=torch_dtype(layout.dtype), device=self.device)
        if out.is_cuda and self.writes_device and self._place_raw(layer_start, layer_end, out):
            return out
        # Codecs with a batched device decoder (CacheGen on CUDA) get every section of one shape in one call.
        batched = getattr(client.codec, "decode_batch", None) if out.is_cuda else None
        batches: dict[tuple, tuple[list, list]] = {}
        with codec_errors():
            self._decode_sections(layer_start, layer_end, out, batched, batches)
            for (start, end, num_tokens, meta), (views, outs) in batches.items():
                batched(views, end - start, num_tokens, outs=outs, meta=meta, layer_start=start)
        return out

    def _place_raw(self, layer_start: int, layer_end: int, out) -> bool:
        """Raw objects in page-locked memory to a GPU ``out``: per run of equal-sized consecutive chunks, one
        asynchronous copy per object into a staging tensor, then one kernel that puts the tokens in place (all on
        the current stream). False (nothing done) when an object's sections of the group are not back to back."""
        import torch

        from kdn.wire.buffers import host_tensor

        layout = self.client.layout
        g = layer_end - layer_start
        per_token = layout.bytes_per_token // layout.num_layers
        runs: list[list[tuple[int, int, memoryview]]] = []
        for chunk, data, header in self.objects:
            sections = header.sections_for(layer_start, layer_end)
            if not sections or sections[0].layer_start != layer_start or sections[-1].layer_end != layer_end or any(
                    a.offset + a.length != b.offset for a, b in zip(sections, sections[1:])):
                return False
            first, tokens = sections[0].offset, chunk.span.num_tokens
            nbytes = sections[-1].offset + sections[-1].length - first
            if nbytes != g * per_token * tokens:
                return False
            item = (chunk.span.start, tokens, memoryview(data)[first:first + nbytes])
            last = runs[-1][-1] if runs else None
            if last is not None and last[1] == tokens and last[0] + last[1] == item[0]:
                runs[-1].append(item)
            else:
                runs.append([item])
        heads, dim = layout.num_kv_heads, layout.head_dim
        for run in runs:
            k, t, s0 = len(run), run[0][1], run[0][0]
            stage = torch.empty((k, g * per_token * t), dtype=torch.uint8, device=out.device)
            for i, (_, _, view) in enumerate(run):
                stage[i].copy_(host_tensor(view), non_blocking=True)
            dst = out[:, :, s0:s0 + k * t].view(g, 2, k, t, heads, dim)
            dst.copy_(stage.view(out.dtype).view(k, g, 2, t, heads, dim).permute(1, 2, 0, 3, 4, 5))
        return True

    def _decode_sections(self, layer_start: int, layer_end: int, out, batched, batches: dict) -> None:
        client = self.client
        for chunk, data, header in self.objects:
            for section in header.sections_for(layer_start, layer_end):
                if section.layer_start < layer_start or section.layer_end > layer_end:
                    raise InvalidRequest("layer group does not align with the objects' sections")
                view = memoryview(data)[section.offset:section.offset + section.length]
                target = out[section.layer_start - layer_start:section.layer_end - layer_start, :,
                             chunk.span.start:chunk.span.end]
                if batched is not None:
                    views, outs = batches.setdefault(
                        (section.layer_start, section.layer_end, header.num_tokens, bytes(header.codec_meta)),
                        ([], []))
                    views.append(view)
                    outs.append(target)
                    continue
                client.codec.decode(view, section.layer_end - section.layer_start, header.num_tokens,
                                    meta=header.codec_meta, device=self.device, layer_start=section.layer_start,
                                    out=target)

    def __iter__(self):
        groups = self.groups()
        if not groups:
            self.close()
            return
        pool = self.client._decode_pool
        pending = pool.submit(self.decode_group, *groups[0])
        try:
            for i, (start, end) in enumerate(groups):
                kv = pending.result()
                if i + 1 < len(groups):
                    pending = pool.submit(self.decode_group, *groups[i + 1])
                yield start, end, kv
        finally:
            pending.cancel() or pending.exception()  # never free buffers a running decode still reads
            self.close()


def _close_arrival(arrival, pool: ReceivePool | None, leases: list[Lease], pinned: bool) -> None:
    arrival.close(lambda: release_leases(pool, list(leases), pinned))


def release_leases(pool: ReceivePool | None, leases: list[Lease], pinned: bool) -> None:
    """Return receive buffers to the pool, after any GPU copy still reading them has finished."""
    if not leases or pool is None:
        return
    if pinned:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    for lease in leases:
        pool.release(lease)
