"""A layer source that copies ``raw`` chunk objects straight from a node's mapped shared arena (:mod:`kdn.wire.shm`).

On a GPU, per layer group: one host-to-device copy of every object's bytes of that group into a staging tensor
(``cudaMemcpy2DAsync`` when the objects sit at equal strides in the arena, as consecutive puts place them: one call
for all of them; else one copy per object), from memory registered with CUDA, then one kernel that puts the tokens
in place. Each copy call costs tens of microseconds of host time on some hosts, so their number matters more than
their size. See :mod:`connectors.hf.loader` for the layer-source protocol.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from kdn.errors import InvalidRequest, KDNError
from kdn.wire.shm import is_shared

__all__ = ["SharedRawSource", "fast_source"]

log = logging.getLogger(__name__)

_H2D = 1  # cudaMemcpyHostToDevice
_memcpy2d_fn: Any = None


def _memcpy2d() -> Any:
    """``cudaMemcpy2DAsync`` of the CUDA runtime torch loaded (through ctypes), or None where unavailable."""
    global _memcpy2d_fn
    if _memcpy2d_fn is None:
        _memcpy2d_fn = False
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                fn = ctypes.CDLL(name).cudaMemcpy2DAsync
            except (OSError, AttributeError):
                continue
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _memcpy2d_fn = fn
            break
    return _memcpy2d_fn or None


class SharedRawSource:
    """A layer source over ``raw`` objects in mapped arenas (build it with :func:`fast_source`).

    With ``direct`` (the arenas are registered with CUDA) it writes GPU ``out`` tensors and only enqueues work on
    the current stream (``writes_device``, ``enqueue_only``); else ``out`` is host memory (the loader's pinned
    staging), filled with CPU copies. Layer groups are widened to ``min_copy_bytes`` per object.
    """

    #: Use the GPU path's batching (staging tensor + one placing copy per batch) for host ``out`` too (tests).
    batch_on_host = False

    def __init__(self, stream: Any, min_copy_bytes: int = 4 << 20, direct: bool = True) -> None:
        self.writes_device = self.enqueue_only = direct
        self.stream = stream
        self.num_tokens, self.bytes = stream.num_tokens, stream.bytes
        layout = stream.client.layout
        self._objects = stream.objects
        per_layer = max(1, layout.bytes_per_token // layout.num_layers
                        * max(c.span.num_tokens for c, _, _ in self._objects))
        self._groups = _widen(stream.groups(), max(1, -(-min_copy_bytes // per_layer)))
        self._shape = (layout.num_kv_heads, layout.head_dim)
        self._token_bytes = layout.bytes_per_token // layout.num_layers // 2
        # Per object: (first token, tokens, mapping, {layer: byte offset in the arena}) — section k's bytes run
        # from offsets[layer_start] to offsets[layer_end] (sections are back to back).
        self._where = []
        for chunk, data, header in self._objects:
            offsets = {s.layer_start: data.obj.offset + s.offset for s in header.sections}
            offsets.update({s.layer_end: data.obj.offset + s.offset + s.length for s in header.sections})
            self._where.append((chunk.span.start, chunk.span.num_tokens, data.obj.mapping, offsets))

    def groups(self) -> list[tuple[int, int]]:
        return self._groups

    def decode_group(self, layer_start: int, layer_end: int, out: Any) -> Any:
        import torch

        cuda = out.device.type == "cuda"
        batched = cuda or self.batch_on_host
        g = layer_end - layer_start
        batch: list[tuple[int, int, int, Any]] = []  # (first token, tokens, address, base): adjacent, equal strides
        for start, tokens, mapping, offsets in self._where:
            first, last = offsets.get(layer_start), offsets.get(layer_end)
            if first is None or last is None:
                raise InvalidRequest("layer group does not align with the objects' sections")
            nbytes = g * 2 * tokens * self._token_bytes
            if last - first != nbytes:
                raise InvalidRequest("raw section size does not match the layout")
            base = mapping.tensor(cuda)
            if not batched:  # bytes may sit at any alignment: copy them as bytes
                dst = out[:, :, start:start + tokens].view(torch.uint8)
                dst.copy_(base[first:last].view(dst.shape))
                continue
            item = (start, tokens, base.data_ptr() + first, base)
            if batch and not _extends(batch, item, nbytes):
                self._place(out, batch)
                batch = []
            batch.append(item)
        if batch:
            self._place(out, batch)
        return out

    def _place(self, out: Any, batch: list[tuple[int, int, int, Any]]) -> None:
        """Copy the batch's objects to the GPU, then into ``out``'s token range in one kernel."""
        import torch

        global _memcpy2d_fn
        k, t = len(batch), batch[0][1]
        nbytes = out.shape[0] * 2 * t * self._token_bytes
        stage = torch.empty((k, nbytes), dtype=torch.uint8, device=out.device)
        fn = _memcpy2d() if k > 1 and out.device.type == "cuda" else None
        rc = -1
        if fn is not None:
            rc = fn(stage.data_ptr(), nbytes, batch[0][2], batch[1][2] - batch[0][2], nbytes, k, _H2D,
                    torch.cuda.current_stream(out.device).cuda_stream)
            if rc != 0:
                log.warning("cudaMemcpy2DAsync failed (error %d); copying object by object", rc)
                _memcpy2d_fn = False
        if rc != 0:
            for i, (_, _, address, base) in enumerate(batch):
                offset = address - base.data_ptr()
                stage[i].copy_(base[offset:offset + nbytes], non_blocking=True)
        s0 = batch[0][0]
        dst = out[:, :, s0:s0 + k * t].view(out.shape[0], 2, k, t, *self._shape)
        dst.copy_(stage.view(out.dtype).view(k, out.shape[0], 2, t, *self._shape).permute(1, 2, 0, 3, 4, 5))


def _extends(batch: list[tuple[int, int, int, Any]], item: tuple[int, int, int, Any], nbytes: int) -> bool:
    """Whether ``item`` (first token, tokens, address, base) continues the batch: the next tokens, the same size,
    and (so that one strided copy moves them all) the same distance in the arena as between the batch's items."""
    last = batch[-1]
    if last[1] != item[1] or last[0] + last[1] != item[0] or last[3] is not item[3]:
        return False
    step = item[2] - last[2]
    if len(batch) == 1:
        return step >= nbytes
    return step == batch[1][2] - batch[0][2]


def _widen(groups: list[tuple[int, int]], layers: int) -> list[tuple[int, int]]:
    """Merge consecutive groups until each spans at least ``layers`` layers (the last may be shorter)."""
    out: list[tuple[int, int]] = []
    for start, end in groups:
        if out and out[-1][1] - out[-1][0] < layers:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def fast_source(stream: Any, device: Any = "cpu") -> Any:
    """:class:`SharedRawSource` over ``stream`` (a :class:`kdn.client.LayerStream`) when every object is a
    ``raw`` object in a mapped arena; else ``stream`` unchanged. For a CUDA ``device`` the arenas are registered
    with CUDA (once per mapping); if that fails the source fills host staging instead (``writes_device`` False)."""
    try:
        objects = stream.objects
        if not objects or stream.client.codec.name != "raw" or not all(is_shared(d) for _, d, _ in objects):
            return stream
        cuda = str(device).startswith("cuda")
        direct = True
        if cuda:
            for mapping in {id(d.obj.mapping): d.obj.mapping for _, d, _ in objects}.values():
                mapping.tensor(cuda=True)
                direct = direct and mapping.registered
        # Wide groups save copy calls on a GPU; on the host the loader's per-layer lookahead paces the load.
        return SharedRawSource(stream, min_copy_bytes=(4 << 20) if cuda and direct else 0, direct=direct)
    except (AttributeError, KDNError):
        return stream
