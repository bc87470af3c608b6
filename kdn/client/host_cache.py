"""An in-process host-memory prefix cache: decoded KV of recent chunks kept in (pinned) CPU memory.

It is KDN's "in-process CPU tier" for one engine process: chunks are keyed exactly like KDN's (prefix-chain keys
under a tenant and the layout fingerprint), so a hit means the exact prefix under the same model. Because it holds
*decoded* KV in pinned memory, a hit costs one host-to-device copy per layer and chunk — the load-bound ideal —
with no codec, socket or checksum on the path (the bytes never leave this process; they were produced here or
verified by the KDN client when they arrived). It has the same ``retrieve_layers``/``store`` surface as
:class:`kdn.client.KDNClient`, so :func:`connectors.hf.kdn_generate` takes either.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kdn.errors import InvalidRequest
from kdn.format.keys import prefix_keys
from kdn.format.layout import KVLayout

__all__ = ["HostKVCache", "HostStoreResult"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HostStoreResult:
    stored: int = 0
    skipped: int = 0
    evicted: int = 0
    failed: int = 0
    dropped: bool = False
    error: str = ""


@dataclass(frozen=True)
class _Entry:
    """One chunk: tokens ``[offset, offset + length)`` of a pinned segment ``[layers, 2, tokens, heads, dim]``."""

    segment: torch.Tensor
    offset: int
    length: int
    nbytes: int


class _HostStream:
    """The layer-source view of a host-cache hit (see :mod:`connectors.hf.loader`).

    Chunks stored together share one segment, so a run of them is copied with two transfers (K, V) per layer.
    """

    writes_device = True
    enqueue_only = True  # on a GPU decode_group only enqueues copies from pinned memory

    def __init__(self, entries: list[_Entry], num_layers: int) -> None:
        self.num_tokens = sum(e.length for e in entries)
        self.num_layers = num_layers
        self.bytes = sum(e.nbytes for e in entries)
        self.runs: list[tuple[int, torch.Tensor, int, int]] = []  # (prompt start, segment, offset, length)
        pos = 0
        for e in entries:
            last = self.runs[-1] if self.runs else None
            if last is not None and last[1] is e.segment and last[2] + last[3] == e.offset:
                self.runs[-1] = (last[0], last[1], last[2], last[3] + e.length)
            else:
                self.runs.append((pos, e.segment, e.offset, e.length))
            pos += e.length

    def groups(self) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(self.num_layers)] if self.runs else []

    def decode_group(self, layer_start: int, layer_end: int, out: torch.Tensor) -> torch.Tensor:
        non_blocking = out.device.type != "cpu"
        for start, segment, offset, length in self.runs:
            for layer in range(layer_start, layer_end):
                for kv in (0, 1):  # contiguous source and destination: one plain memcpy each
                    out[layer - layer_start, kv, start:start + length].copy_(
                        segment[layer, kv, offset:offset + length], non_blocking=non_blocking)
        return out


class HostKVCache:
    """Decoded chunk KV in host memory, LRU-bounded by ``capacity_bytes``. Thread-safe.

    ``pin`` (default: when CUDA is available) allocates page-locked memory so copies to the GPU are asynchronous
    and run at full PCIe/NVLink speed. The new chunks of one ``store`` share one segment (so they load with few
    large copies); a segment's memory is returned when its last chunk is evicted, and usage counts chunk bytes.
    """

    def __init__(self, layout: KVLayout, *, chunk_size: int = 256, capacity_bytes: int = 4 << 30,
                 tenant: str = "default", pin: bool | None = None) -> None:
        if chunk_size <= 0 or capacity_bytes <= 0:
            raise InvalidRequest("chunk_size and capacity_bytes must be positive")
        self.layout = layout
        self.chunk_size = chunk_size
        self.capacity_bytes = capacity_bytes
        self.tenant = tenant
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._fingerprint = layout.fingerprint()
        self._chunks: OrderedDict[str, _Entry] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def keys(self, tokens):
        return prefix_keys(tokens, self.tenant, self._fingerprint, "host", self.chunk_size, include_partial=True)

    def lookup(self, tokens) -> int:
        """Leading tokens of ``tokens`` whose KV is held."""
        hit = 0
        with self._lock:
            for span, key in self.keys(tokens):
                if str(key) not in self._chunks:
                    break
                hit = span.end
        return hit

    def retrieve_layers(self, tokens, *, device="cpu", max_tokens: int | None = None) -> _HostStream:
        """The longest held prefix of ``tokens`` (at most ``max_tokens``) as a layer source."""
        found = []
        with self._lock:
            for span, key in self.keys(tokens):
                if max_tokens is not None and span.end > max_tokens:
                    break
                entry = self._chunks.get(str(key))
                if entry is None:
                    break
                self._chunks.move_to_end(str(key))
                found.append(entry)
        return _HostStream(found, self.layout.num_layers)

    def store(self, tokens, kv: torch.Tensor, *, copy: bool = True) -> Future:
        """Copy the chunks of ``kv`` (``[layers, 2, len(tokens), heads, dim]``) that are not held yet.

        Synchronous (a memory copy); returns a completed future of :class:`HostStoreResult` to match
        :meth:`kdn.client.KDNClient.store`. ``copy`` is accepted for that symmetry; data is always copied.
        """
        dtype = _DTYPES[self.layout.dtype]
        if kv.dtype != dtype or kv.dim() != 5 or kv.shape[0] != self.layout.num_layers or tuple(kv.shape[3:]) != (
                self.layout.num_kv_heads, self.layout.head_dim):
            raise InvalidRequest(f"KV {tuple(kv.shape)}/{kv.dtype} does not match the layout")
        keyed = self.keys(tokens)
        num_tokens = keyed[-1][0].end if keyed else 0
        if kv.shape[2] != num_tokens:
            raise InvalidRequest(f"KV holds {kv.shape[2]} tokens but {num_tokens} tokens were given")
        result = HostStoreResult()
        with self._lock:
            new = [(span, str(key)) for span, key in keyed if str(key) not in self._chunks]
        result.skipped = len(keyed) - len(new)
        per_token = self.layout.bytes_per_token
        new = [(span, name) for span, name in new if span.num_tokens * per_token <= self.capacity_bytes]
        result.failed = len(keyed) - result.skipped - len(new)
        if new:
            first, last = new[0][0].start, new[-1][0].end
            segment = torch.empty(self.layout.shape(last - first), dtype=dtype, pin_memory=self.pin)
            segment.copy_(kv[:, :, first:last])
            with self._lock:
                for span, name in new:
                    size = span.num_tokens * per_token
                    while self._used + size > self.capacity_bytes and self._chunks:
                        _, old = self._chunks.popitem(last=False)
                        self._used -= old.nbytes
                        result.evicted += 1
                    if name not in self._chunks:
                        self._chunks[name] = _Entry(segment, span.start - first, span.num_tokens, size)
                        self._used += size
                        result.stored += 1
        future: Future = Future()
        future.set_result(result)
        return future

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._used = 0

    def close(self) -> None:
        self.clear()

    def __enter__(self) -> HostKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
