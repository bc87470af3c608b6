"""Attention of a subset of queries over all keys, causal by position (CacheBlend's recompute step).

The kept queries sit at arbitrary sorted positions ``q_pos`` of a prompt of ``N`` tokens and each attends to keys
``0 .. q_pos[i]``. Three ways, picked by :func:`attend`:

* every position kept: a plain causal prefill (flash kernels on a GPU);
* on CUDA with Triton: :func:`_positional_attention`, a flash-attention forward whose causal mask compares key
  indices with each query's position, skipping key blocks past a query block's last position (cost proportional
  to the keys actually visible);
* otherwise: scaled-dot-product attention with a boolean ``[n, N]`` mask (on CUDA with many queries, scattering them
  to their positions and running one causal pass is faster than a masked one, which cannot skip the masked half).

All three give the same result up to floating-point rounding (the GPU tests compare them). With a sliding
``window`` (Gemma 3's local layers), a query at ``p`` sees keys ``p - window < j <= p`` (the model's own mask):
SDPA with that mask, everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attend", "triton_available"]


def _has_gqa() -> bool:
    """Whether SDPA takes ``enable_gqa`` (torch >= 2.5): grouped KV heads without copies."""
    try:
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2),
                                       enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


_GQA = _has_gqa()
_kernel = None


def triton_available() -> bool:
    """Whether the Triton kernel can run (Triton installed and a CUDA device present)."""
    return _get_kernel() is not None and torch.cuda.is_available()


def _get_kernel():
    global _kernel
    if _kernel is None:
        try:
            _kernel = _build_kernel()
        except Exception:  # noqa: BLE001 - no Triton (CPU installs): the SDPA paths remain
            _kernel = False
    return _kernel or None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float, *,
           use_triton: bool | None = None, window: int | None = None) -> torch.Tensor:
    """Queries ``[1, heads, n, d]`` at sorted positions ``q_pos [n]`` over keys/values ``[1, kv_heads, N, d]``
    (causal by position) -> ``[1, heads, n, d]``. ``use_triton`` forces (True) or forbids (False) the Triton
    kernel; by default it is used on CUDA when available and fewer than all positions are kept."""
    n, n_keys = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if window is not None and window < n_keys:
        cols = torch.arange(n_keys, device=q.device)[None, :]
        mask = (cols <= q_pos[:, None]) & (cols > q_pos[:, None] - window)  # [n, N]
        return _sdpa(q, k, v, scale, groups, mask=mask[None, None])
    if n == n_keys:
        return _sdpa(q, k, v, scale, groups, is_causal=True)
    if use_triton is None:
        use_triton = q.is_cuda and triton_available()
    if use_triton:
        return _positional_attention(q, k, v, q_pos, scale)
    if q.is_cuda and 3 * n > n_keys:
        full = q.new_zeros(q.shape[0], q.shape[1], n_keys, q.shape[3]).index_copy_(2, q_pos, q)
        return _sdpa(full, k, v, scale, groups, is_causal=True).index_select(2, q_pos)
    mask = torch.arange(n_keys, device=q.device)[None, :] <= q_pos[:, None]  # [n, N]
    return _sdpa(q, k, v, scale, groups, mask=mask[None, None])


def _sdpa(q, k, v, scale, groups, *, is_causal: bool = False, mask=None):
    if groups > 1 and not _GQA:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **extra)


def _positional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                          scale: float) -> torch.Tensor:
    kernel = _get_kernel()
    if kernel is None:
        raise RuntimeError("Triton is not available")
    _, heads, n, d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if d not in (16, 32, 64, 128, 256) or heads % kv_heads:
        raise ValueError(f"positional attention: unsupported head_dim {d} or heads {heads}/{kv_heads}")
    out = torch.empty((1, heads, n, d), dtype=q.dtype, device=q.device)
    pos = q_pos.to(torch.int32).contiguous()
    block_m, block_n = 64, 64
    grid = ((n + block_m - 1) // block_m, heads)
    kernel[grid](q, k, v, out, pos, float(scale) * 1.4426950408889634, n, n_keys, heads // kv_heads,
                 *q.stride()[1:], *k.stride()[1:], *v.stride()[1:], *out.stride()[1:],
                 BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, num_warps=4, num_stages=2)
    return out


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def positional_attention(Q, K, V, Out, POS, scale_log2, n, n_keys, groups,
                             sqh, sqm, sqd, skh, skn, skd, svh, svn, svd, soh, som, sod,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // groups
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < n
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
        last = tl.max(pos, axis=0)  # positions are sorted: keys past the block's last position are masked
        q = tl.load(Q + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        end = tl.minimum(last + 1, n_keys)
        for start in range(0, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n_keys
            kt = tl.load(K + kvh * skh + cols[None, :] * skn + dims[:, None] * skd, mask=col_ok[None, :], other=0.0)
            s = tl.dot(q, kt) * scale_log2
            visible = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(V + kvh * svh + cols[:, None] * svn + dims[None, :] * svd, mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + h * soh + rows[:, None] * som + dims[None, :] * sod, acc.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])

    return positional_attention
