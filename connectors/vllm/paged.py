"""vLLM's paged CPU KV cache <-> KDN's ``[2, tokens, kv_heads, head_dim]`` per layer.

vLLM's CPU attention backend (``vllm/v1/attention/backends/cpu_attn.py``) gives each attention layer one tensor
``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``. Viewed as ``[num_blocks, num_kv_heads, 2, block_size *
head_dim]``, the first half of each (block, head) row holds the keys and the second half the values, each in an
order that depends on the kernel ISA: with ``vec``/``vec16`` the keys are stored transposed (``[head_dim,
block_size]``) and the values token-major; with ``amx`` both are packed for the tile unit.

Rather than hard-coding those orders, :func:`probe_permutation` asks the engine's own writer
(``cpu_attn_reshape_and_cache``) where each (token, dim) element of one block lands, which gives one index
permutation per K and V. :class:`PagedKVLayout` then gathers and scatters whole blocks with ``index_select`` /
indexed assignment: exact, vectorized, and right for whatever ISA the engine picked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kdn.errors import InvalidRequest

__all__ = ["PagedKVLayout", "StridedKVLayout", "probe_permutation", "Writer"]

#: ``writer(key, value, key_cache, value_cache, slot_mapping)`` — the engine's cache write for one layer:
#: ``key``/``value`` ``[tokens, heads, dim]``, caches ``[blocks, heads, block_size, dim]`` views.
Writer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _split(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views the CPU backend hands its kernels."""
    blocks, heads, block_size, _ = cache.shape
    kv = cache.view(blocks, heads, block_size * 2, -1)
    key, value = kv.chunk(2, dim=2)
    return key, value


def probe_permutation(writer: Writer, block_size: int, head_dim: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``writer`` puts each element of one block: ``(perm_k, perm_v)``, each ``[block_size * head_dim]``.

    ``perm[t * head_dim + d]`` is the offset, inside a (block, head) K (or V) region, of token ``t``'s element
    ``d``. Offsets are written as two base-256 digits so they stay exact in bf16/fp16.
    """
    n = block_size * head_dim
    index = torch.arange(n, dtype=torch.int64)
    where = torch.zeros(2, n, dtype=torch.int64)
    for digit, scale in ((index % 256, 1), (index // 256, 256)):
        cache = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = _split(cache)
        src = digit.to(dtype).view(block_size, 1, head_dim)
        writer(src, src.clone(), key_cache, value_cache, torch.arange(block_size, dtype=torch.int64))
        regions = cache.view(2, n)  # [K region, V region] of the single (block, head)
        # regions[r, offset] holds digit(t * head_dim + d); invert: perm[t * head_dim + d] = offset
        where += regions.to(torch.int64) * scale
    perms = []
    for r in range(2):
        perm = torch.empty(n, dtype=torch.int64)
        perm[where[r]] = torch.arange(n, dtype=torch.int64)
        if not torch.equal(torch.sort(where[r]).values, index):
            raise InvalidRequest("the engine's KV cache writer is not a per-block permutation; unsupported layout")
        perms.append(perm)
    return perms[0], perms[1]


@dataclass
class PagedKVLayout:
    """Gather/scatter of whole blocks between one layer's paged cache and ``[2, tokens, heads, dim]``."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    perm_k: torch.Tensor
    perm_v: torch.Tensor

    def __post_init__(self) -> None:
        n = self.block_size * self.head_dim
        self._gather_idx = torch.cat([self.perm_k, self.perm_v + n])  # natural -> storage offset in [K|V] row
        self._natural = bool(torch.equal(self._gather_idx, torch.arange(2 * n)))

    @classmethod
    def natural(cls, block_size: int, num_kv_heads: int, head_dim: int) -> PagedKVLayout:
        """Token-major K and V (no permutation)."""
        ident = torch.arange(block_size * head_dim)
        return cls(block_size, num_kv_heads, head_dim, ident, ident.clone())

    @classmethod
    def probe(cls, writer: Writer, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
              ) -> PagedKVLayout:
        perm_k, perm_v = probe_permutation(writer, block_size, head_dim, dtype)
        return cls(block_size, num_kv_heads, head_dim, perm_k, perm_v)

    def check(self, cache: torch.Tensor) -> None:
        expected = (self.num_kv_heads, self.block_size, 2 * self.head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != expected or not cache.is_contiguous():
            raise InvalidRequest(f"paged KV cache of shape {tuple(cache.shape)} is not [blocks, {expected[0]}, "
                                 f"{expected[1]}, {expected[2]}] contiguous (vLLM CPU attention layout)")

    def _rows(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(cache.shape[0], self.num_kv_heads, 2 * self.block_size * self.head_dim)

    def gather(self, cache: torch.Tensor, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """KV of whole blocks ``block_ids`` as ``[2, len(block_ids) * block_size, heads, dim]`` (into ``out``)."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        rows = self._rows(cache).index_select(0, ids)  # [nb, H, 2*bs*D] in storage order
        if not self._natural:
            rows = rows.index_select(2, self._gather_idx)
        nat = rows.view(len(ids), self.num_kv_heads, 2, self.block_size, self.head_dim).permute(2, 0, 3, 1, 4)
        shape = (2, len(ids) * self.block_size, self.num_kv_heads, self.head_dim)
        if out is None:
            return nat.reshape(shape)
        out.view(2, len(ids), self.block_size, self.num_kv_heads, self.head_dim).copy_(nat)
        return out

    def scatter(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write ``kv`` (``[2, len(block_ids) * block_size, heads, dim]``) into whole blocks ``block_ids``."""
        nb = len(block_ids)
        if tuple(kv.shape) != (2, nb * self.block_size, self.num_kv_heads, self.head_dim):
            raise InvalidRequest(f"KV of shape {tuple(kv.shape)} does not fill {nb} blocks of {self.block_size}")
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        nat = kv.to(cache.dtype).view(2, nb, self.block_size, self.num_kv_heads, self.head_dim).permute(1, 3, 0, 2, 4)
        nat = nat.reshape(nb, self.num_kv_heads, 2 * self.block_size * self.head_dim)
        if not self._natural:
            stored = torch.empty_like(nat)
            stored[:, :, self._gather_idx] = nat
            nat = stored
        self._rows(cache).index_copy_(0, ids, nat)


@dataclass
class StridedKVLayout:
    """Gather/scatter of whole blocks for vLLM's GPU attention backends (FlashAttention, FlashInfer, Triton, Flex).

    vLLM 0.32 hands every layer a logical ``[num_blocks, num_kv_heads, block_size, head_dim + head_dim]`` view
    (per block, head and token the keys then the values) whose physical strides follow the model's resolved
    ``KVCacheLayout`` (``LBNHC``, ``LBHNC``, ``BLHNC``, ... — see :mod:`connectors.vllm.layouts`); the backends
    split it with ``kv_cache.transpose(1, 2).split(head_size, -1)`` (FlashAttention) or after permuting by
    ``layer_view_order`` (FlashInfer). This class works on the logical view whatever its strides: a gather is
    one ``index_select`` over the block axis of the ``[2, blocks, block_size, heads, dim]`` re-view straight into
    the output, a scatter one ``index_copy_`` back — one kernel per layer (and request), on the cache's device.
    """

    block_size: int
    num_kv_heads: int
    head_dim: int

    def check(self, cache: torch.Tensor) -> None:
        expected = (self.num_kv_heads, self.block_size, 2 * self.head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != expected or cache.stride(3) != 1:
            raise InvalidRequest(f"paged KV cache of shape {tuple(cache.shape)} strides {cache.stride()} is not "
                                 f"[blocks, {expected[0]}, {expected[1]}, {expected[2]}] with a dense last axis "
                                 f"(vLLM's logical per-layer view)")

    def _kv(self, cache: torch.Tensor) -> torch.Tensor:
        """``[2, num_blocks, block_size, heads, dim]`` view of the cache (no copy)."""
        return cache.unflatten(3, (2, self.head_dim)).permute(3, 0, 2, 1, 4)

    def _ids(self, cache: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cache.shape[0]):
            raise InvalidRequest(f"block ids outside [0, {cache.shape[0]})")
        return ids.to(cache.device, non_blocking=True)

    def gather(self, cache: torch.Tensor, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """KV of whole blocks ``block_ids`` as ``[2, len(block_ids) * block_size, heads, dim]`` (into ``out``,
        which must be contiguous and on the cache's device)."""
        nb = len(block_ids)
        shape = (2, nb * self.block_size, self.num_kv_heads, self.head_dim)
        if out is None:
            out = torch.empty(shape, dtype=cache.dtype, device=cache.device)
        if tuple(out.shape) != shape or not out.is_contiguous() or out.device != cache.device:
            raise InvalidRequest(f"gather output {tuple(out.shape)} on {out.device} is not a contiguous {shape} "
                                 f"on {cache.device}")
        torch.index_select(self._kv(cache), 1, self._ids(cache, block_ids),
                           out=out.view(2, nb, self.block_size, self.num_kv_heads, self.head_dim))
        return out

    def scatter(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write ``kv`` (``[2, len(block_ids) * block_size, heads, dim]``, any device) into blocks ``block_ids``."""
        nb = len(block_ids)
        if tuple(kv.shape) != (2, nb * self.block_size, self.num_kv_heads, self.head_dim):
            raise InvalidRequest(f"KV of shape {tuple(kv.shape)} does not fill {nb} blocks of {self.block_size}")
        src = kv.to(device=cache.device, dtype=cache.dtype, non_blocking=True)
        self._kv(cache).index_copy_(1, self._ids(cache, block_ids),
                                    src.reshape(2, nb, self.block_size, self.num_kv_heads, self.head_dim))
