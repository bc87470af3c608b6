"""Selective recompute over reused chunk KV (CacheBlend), a layer-by-layer forward with the model's own modules.

Inputs are chunk KVs computed alone at position 0 (content-keyed) plus every token id of the prompt
``[chunk_1 ... chunk_n, query]``. Keys are re-rotated to each chunk's position and concatenated; then:

* layers before the first selection layer run in full (their K/V replace the reused ones — layer 0 never deviates);
* at a selection layer, Q/K/V are computed for the current token set, the recomputed K/V overwrite the reused rows,
  context tokens are ranked by K/V deviation (by default weighted by the query tokens' attention to them) and only
  the top ones (plus every query token and the forced ones: each chunk's first token by default) go on;
* attention runs for the kept tokens over all keys (causal by position), then the MLP, for the kept tokens only.

Everything is batched index gather/scatter in plain torch, so the same code runs on CPU and GPU; on CUDA, chunks in
host memory are copied layer by layer on a side stream, overlapping the recompute. Supported:
Llama-, Mistral- and Qwen2-style decoder layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp``), full attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from connectors.hf.cache import check_supported
from kdn.blend.rope import rerotate, rope_inv_freq
from kdn.blend.select import DEFAULT_SCORE, DEFAULT_SINK, Schedule, deviation, schedule, top_tokens
from kdn.errors import InvalidRequest

__all__ = ["BlendResult", "blend", "concat_chunks"]



def _has_gqa() -> bool:
    """Whether SDPA takes ``enable_gqa`` (torch >= 2.5): grouped KV heads without copies."""
    try:
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2),
                                       enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


_GQA = _has_gqa()


@dataclass
class BlendResult:
    kv: torch.Tensor
    """The blended KV of every prompt token ``[layers, 2, tokens, kv_heads, head_dim]``."""
    logits: torch.Tensor
    """Logits of the last prompt token ``[1, vocab]``."""
    selected: torch.Tensor
    """Context token positions recomputed through the last layer (sorted)."""
    num_context: int
    recomputed: list[int] = field(default_factory=list)
    """Tokens whose Q/K/V were computed, per layer (the cost relative to a prefill is ``sum / (layers * tokens)``)."""

    @property
    def compute_fraction(self) -> float:
        total = len(self.recomputed) * int(self.kv.shape[2])
        return sum(self.recomputed) / total if total else 0.0


def concat_chunks(chunk_kvs: Sequence[torch.Tensor], inv_freq: torch.Tensor) -> torch.Tensor:
    """Position-0 chunk KVs re-rotated to their places and concatenated along tokens (one new tensor)."""
    if not chunk_kvs:
        raise InvalidRequest("no chunks to blend")
    total = sum(int(kv.shape[2]) for kv in chunk_kvs)
    first = chunk_kvs[0]
    out = torch.empty((first.shape[0], 2, total, first.shape[3], first.shape[4]), dtype=first.dtype,
                      device=first.device)
    start = 0
    for kv in chunk_kvs:
        n = int(kv.shape[2])
        out[:, 1, start:start + n] = kv[:, 1]
        out[:, 0, start:start + n] = rerotate(kv[:, 0], start, inv_freq) if start else kv[:, 0]
        start += n
    return out


def _check_layers(model) -> None:
    check_supported(model.config)
    cfg = model.config
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if "sliding_attention" in kinds or (not kinds and getattr(cfg, "sliding_window", None)
                                        and getattr(cfg, "use_sliding_window", True)):
        raise InvalidRequest("blend: sliding-window attention is not supported yet")
    layer = model.model.layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
        if not hasattr(layer, name):
            raise InvalidRequest(f"blend: decoder layer has no {name}")
    if hasattr(layer.self_attn, "q_norm"):
        raise InvalidRequest("blend: attention with q/k norms is not supported")


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Queries ``[1, heads, n, d]`` at positions ``q_pos`` over all keys ``[1, kv_heads, N, d]`` (causal)."""
    n_keys = k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _GQA:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _GQA else {}
    if q.shape[2] == n_keys:  # every token: a plain causal prefill (flash kernels on the GPU)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, **extra)
    mask = torch.arange(n_keys, device=q.device)[None, :] <= q_pos[:, None]  # [n, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=attn.scaling, **extra)


def _query_attention(attn, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean attention weight ``[N]`` (float32) of the query tokens ``q [1, heads, n, d]`` on context keys
    ``[N, kv_heads, d]`` (softmax over the context only)."""
    k = keys.transpose(0, 1).float()  # [kv_heads, N, d]
    qf = q[0].float().reshape(k.shape[0], -1, q.shape[-1])  # [kv_heads, groups * n, d]
    probs = torch.softmax(qf @ k.transpose(1, 2) * attn.scaling, dim=-1)
    return probs.mean(dim=(0, 1))


def _stage(kv: torch.Tensor, chunk_kvs: Sequence[torch.Tensor], inv_freq: torch.Tensor) -> list | None:
    """Write the chunks, re-rotated to their places, into ``kv[:, :, :n_ctx]``.

    Host chunks for a CUDA ``kv`` are copied layer by layer on a side stream, so loading overlaps the recompute
    of earlier layers (the paper's pipelining); the per-layer events are returned for the compute stream to wait
    on. Otherwise the copy is done now and None is returned.
    """
    pipelined = kv.is_cuda and all(not c.is_cuda for c in chunk_kvs)
    stream = torch.cuda.Stream(kv.device) if pipelined else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(kv.device))
    events = []
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        for layer in range(kv.shape[0]):
            start = 0
            for chunk in chunk_kvs:
                n = int(chunk.shape[2])
                dst = kv[layer, :, start:start + n]
                dst.copy_(chunk[layer], non_blocking=pipelined)
                if start:
                    dst[0] = rerotate(dst[0], start, inv_freq)
                start += n
            if stream is not None:
                events.append(torch.cuda.Event())
                events[-1].record(stream)
    return events or None


@torch.no_grad()
def blend(model, chunk_kvs: Sequence[torch.Tensor], input_ids: Sequence[int] | torch.Tensor, *,
          ratio: float = 0.15, method: str = "kdn", score: str | None = None, first_layer: int = 1,
          start_ratio: float | None = None, steps: int | None = None, plan: Schedule | None = None,
          sink: int | None = None, tail: int = 0, quota: bool = False) -> BlendResult:
    """Blend ``chunk_kvs`` (position-0 KV of consecutive chunks) under ``input_ids`` (all prompt tokens: the
    chunks' tokens, then the query's) and recompute the tokens that matter.

    ``ratio`` is the share of context tokens recomputed through the last layer (1.0 is a full prefill);
    ``method`` is ``kdn``, ``gradual`` or ``single`` (see :mod:`kdn.blend.select`); ``score`` the deviation rule
    (default: the method's, :data:`kdn.blend.select.DEFAULT_SCORE`). Query tokens (everything after the chunks)
    are always recomputed. ``sink`` (default: the method's, :data:`kdn.blend.select.DEFAULT_SINK`) forces the
    first ``sink`` tokens of every chunk and ``tail`` the last ``tail`` context tokens through every layer, *on top
    of* the ratio (the cost shows in ``compute_fraction``); ``quota`` splits each selection's budget over the
    chunks by length instead of ranking the whole context at once. Returns the blended KV and the last logits.
    """
    _check_layers(model)
    device, dtype = model.device, model.dtype
    inner = model.model
    layers = inner.layers[: model.config.num_hidden_layers]
    ids = torch.as_tensor(input_ids, device=device).reshape(1, -1)
    n_total = ids.shape[1]
    inv_freq = rope_inv_freq(model, device=device)
    if not chunk_kvs:
        raise InvalidRequest("no chunks to blend")
    n_ctx = sum(int(c.shape[2]) for c in chunk_kvs)
    if n_ctx >= n_total:
        raise InvalidRequest(f"the query is empty: {n_total} tokens, {n_ctx} of them in chunks")
    if any(c.shape[0] != len(layers) for c in chunk_kvs):
        raise InvalidRequest(f"chunk KV has {chunk_kvs[0].shape[0]} layers, the model {len(layers)}")
    score = score or DEFAULT_SCORE.get(method, "value")
    sink = DEFAULT_SINK.get(method, 0) if sink is None else sink
    plan = plan or schedule(len(layers), ratio, method, first_layer=first_layer, start_ratio=start_ratio,
                            steps=steps)
    shape = chunk_kvs[0].shape
    kv = torch.empty((len(layers), 2, n_total, shape[3], shape[4]), dtype=dtype, device=device)
    on_host = device.type == "cuda" and all(not c.is_cuda for c in chunk_kvs)
    events = _stage(kv, [c if on_host else c.to(device) for c in chunk_kvs], inv_freq)

    hidden = inner.embed_tokens(ids)  # [1, N, H]
    positions = torch.arange(n_total, device=device)
    cos_all, sin_all = inner.rotary_emb(hidden, positions[None])  # [1, N, d]
    sel = positions  # token positions still being recomputed (sorted)
    lengths = [int(c.shape[2]) for c in chunk_kvs]
    starts = torch.tensor([0] + lengths, device=device).cumsum(0)
    chunk_of = torch.bucketize(positions, starts[1:], right=True)  # chunk index of each position (n = query)
    forced = positions >= n_ctx - tail if tail > 0 else torch.zeros(n_total, dtype=torch.bool, device=device)
    if sink > 0:
        forced |= (positions - starts[chunk_of.clamp_max(len(chunk_kvs) - 1)]) < sink
    forced &= positions < n_ctx
    recomputed: list[int] = []
    for idx, layer in enumerate(layers):
        if events:
            torch.cuda.current_stream(device).wait_event(events[idx])
        attn = layer.self_attn
        hd = attn.head_dim
        x = layer.input_layernorm(hidden)
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = cos_all[:, sel].unsqueeze(1), sin_all[:, sel].unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_rows, v_rows = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [n, kv_heads, d]
        recomputed.append(n)
        keep_ctx = plan.keep(idx, n_ctx)
        if keep_ctx is not None:
            ctx_local = torch.nonzero(sel < n_ctx).flatten()
            ctx_pos = sel[ctx_local]
            base = score.removesuffix("-attn")
            dev = deviation(k_rows[ctx_local], v_rows[ctx_local], kv[idx, 0, ctx_pos], kv[idx, 1, ctx_pos], base)
        kv[idx, 0].index_copy_(0, sel, k_rows)
        kv[idx, 1].index_copy_(0, sel, v_rows)
        if keep_ctx is not None:
            if score.endswith("-attn"):
                w = _query_attention(attn, q[:, :, sel >= n_ctx], kv[idx, 0, :n_ctx])[ctx_pos]
                dev = dev / dev.mean().clamp_min(1e-12) * (w / w.mean().clamp_min(1e-12))
            keep_local = torch.cat((ctx_local[_pick(dev, keep_ctx, forced[ctx_pos], chunk_of[ctx_pos], quota,
                                                    lengths)], torch.nonzero(sel >= n_ctx).flatten()))
            q, hidden, sel = q[:, :, keep_local], hidden[:, keep_local], sel[keep_local]
        keys = kv[idx, 0].transpose(0, 1).unsqueeze(0)
        values = kv[idx, 1].transpose(0, 1).unsqueeze(0)
        out = _attend(attn, q, keys, values, sel)  # [1, heads, n, d]
        out = attn.o_proj(out.transpose(1, 2).reshape(1, q.shape[2], -1))
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    last = inner.norm(hidden[:, -1:])
    logits = model.lm_head(last)[:, -1]
    selected = sel[sel < n_ctx]
    return BlendResult(kv=kv, logits=logits.float(), selected=selected, num_context=n_ctx, recomputed=recomputed)


def _pick(dev: torch.Tensor, keep: int, forced: torch.Tensor, chunk: torch.Tensor, quota: bool,
          lengths: list[int]) -> torch.Tensor:
    """Local indices (sorted) of the context tokens kept: every ``forced`` one plus ``keep`` of the others by
    ``dev`` — over the whole context, or (``quota``) ``keep`` split over the chunks by their length."""
    dev = dev.masked_fill(forced, float("inf"))
    n_forced = int(forced.sum())
    if not quota:
        return top_tokens(dev, keep + n_forced)
    parts = []
    for c in torch.unique(chunk).tolist():
        local = torch.nonzero(chunk == c).flatten()
        share = math.ceil(keep * lengths[c] / sum(lengths) - 1e-9) + int(forced[local].sum())
        parts.append(local[top_tokens(dev[local], share)])
    return torch.cat(parts).sort().values


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
