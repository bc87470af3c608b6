"""Selective recompute over reused chunk KV (CacheBlend), a layer-by-layer forward with the model's own modules.

Inputs are chunk KVs computed alone at position 0 (content-keyed) plus every token id of the prompt
``[chunk_1 ... chunk_n, query]``. Keys are re-rotated to each chunk's position and concatenated; then:

* layers before the first selection layer run in full (their K/V replace the reused ones — layer 0 never deviates);
* at a selection layer, Q/K/V are computed for the current token set, the recomputed K/V overwrite the reused rows,
  context tokens are ranked by K/V deviation and only the top ones (plus every query token) go on;
* attention runs for the kept tokens over all keys (causal by position), then the MLP, for the kept tokens only.

Everything is batched index gather/scatter in plain torch, so the same code runs on CPU and GPU. Supported:
Llama-, Mistral- and Qwen2-style decoder layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp``), full attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from connectors.hf.cache import check_supported
from kdn.blend.rope import rerotate, rope_inv_freq
from kdn.blend.select import Schedule, deviation, schedule, top_tokens
from kdn.errors import InvalidRequest

__all__ = ["BlendResult", "blend", "concat_chunks"]


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
    mask = torch.arange(n_keys, device=q.device)[None, :] <= q_pos[:, None]  # [n, N]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=attn.scaling)


@torch.no_grad()
def blend(model, chunk_kvs: Sequence[torch.Tensor], input_ids: Sequence[int] | torch.Tensor, *,
          ratio: float = 0.15, method: str = "gradual", score: str = "value", first_layer: int = 1,
          start_ratio: float | None = None, steps: int = 4, plan: Schedule | None = None) -> BlendResult:
    """Blend ``chunk_kvs`` (position-0 KV of consecutive chunks) under ``input_ids`` (all prompt tokens: the
    chunks' tokens, then the query's) and recompute the tokens that matter.

    ``ratio`` is the share of context tokens recomputed through the last layer (1.0 is a full prefill);
    ``method`` is ``gradual`` or ``single`` (see :mod:`kdn.blend.select`); ``score`` the deviation rule. Query
    tokens (everything after the chunks) are always recomputed. Returns the blended KV and the last logits.
    """
    _check_layers(model)
    device, dtype = model.device, model.dtype
    inner = model.model
    layers = inner.layers[: model.config.num_hidden_layers]
    ids = torch.as_tensor(input_ids, device=device).reshape(1, -1)
    n_total = ids.shape[1]
    inv_freq = rope_inv_freq(model, device=device)
    reused = concat_chunks([kv.to(device=device, dtype=dtype) for kv in chunk_kvs], inv_freq)
    n_ctx = reused.shape[2]
    if n_ctx >= n_total:
        raise InvalidRequest(f"the query is empty: {n_total} tokens, {n_ctx} of them in chunks")
    if reused.shape[0] != len(layers):
        raise InvalidRequest(f"chunk KV has {reused.shape[0]} layers, the model {len(layers)}")
    plan = plan or schedule(len(layers), ratio, method, first_layer=first_layer, start_ratio=start_ratio,
                            steps=steps)
    kv = torch.empty((len(layers), 2, n_total, reused.shape[3], reused.shape[4]), dtype=dtype, device=device)
    kv[:, :, :n_ctx] = reused
    del reused

    hidden = inner.embed_tokens(ids)  # [1, N, H]
    positions = torch.arange(n_total, device=device)
    cos_all, sin_all = inner.rotary_emb(hidden, positions[None])  # [1, N, d]
    sel = positions  # token positions still being recomputed (sorted)
    recomputed: list[int] = []
    for idx, layer in enumerate(layers):
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
            dev = deviation(k_rows[ctx_local], v_rows[ctx_local], kv[idx, 0, ctx_pos], kv[idx, 1, ctx_pos], score)
            keep_local = torch.cat((ctx_local[top_tokens(dev, keep_ctx)], torch.nonzero(sel >= n_ctx).flatten()))
        kv[idx, 0].index_copy_(0, sel, k_rows)
        kv[idx, 1].index_copy_(0, sel, v_rows)
        if keep_ctx is not None:
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
