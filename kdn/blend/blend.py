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
``post_attention_layernorm``, ``mlp``), full attention; and Gemma 3 text models: q/k norms, sandwich norms
(``pre/post_feedforward_layernorm``), a RoPE table per layer type, and sliding-window layers, where each token
attends only to the ``sliding_window`` keys before it (the same mask as the model's own forward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from kdn.blend.attention import attend
from kdn.blend.models import check_blend_supported, text_config
from kdn.blend.rope import layer_inv_freqs, rerotate
from kdn.blend.select import (
    DEFAULT_SCORE,
    DEFAULT_SINK,
    SCORES,
    Schedule,
    deviation,
    preview_weight,
    schedule,
    top_tokens,
)
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


def concat_chunks(chunk_kvs: Sequence[torch.Tensor], inv_freq: torch.Tensor | Sequence[torch.Tensor]
                  ) -> torch.Tensor:
    """Position-0 chunk KVs re-rotated to their places and concatenated along tokens (one new tensor).
    ``inv_freq``: one table for every layer, or one per layer (:func:`kdn.blend.rope.layer_inv_freqs`)."""
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
        if not start:
            out[:, 0, :n] = kv[:, 0]
        elif isinstance(inv_freq, torch.Tensor):
            out[:, 0, start:start + n] = rerotate(kv[:, 0], start, inv_freq)
        else:
            for layer, inv in enumerate(inv_freq):
                out[layer, 0, start:start + n] = rerotate(kv[layer, 0], start, inv)
        start += n
    return out


def _check_layers(model) -> list[int | None]:
    """Refuse what the blend cannot run exactly; each layer's sliding window (None: full attention)."""
    check_blend_supported(model.config)
    cfg = text_config(model.config)
    kinds = list(getattr(cfg, "layer_types", None) or ())
    if not kinds and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise InvalidRequest("blend: sliding-window attention without per-layer types is not supported")
    if "sliding_attention" in kinds and cfg.model_type != "gemma3_text":
        raise InvalidRequest(f"blend: sliding-window layers of {cfg.model_type} are not supported")
    layer = model.model.layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
        if not hasattr(layer, name):
            raise InvalidRequest(f"blend: decoder layer has no {name}")
    if hasattr(layer.self_attn, "q_norm") and cfg.model_type != "gemma3_text":
        raise InvalidRequest("blend: attention with q/k norms is not supported")
    window = getattr(cfg, "sliding_window", None)
    return [window if kind == "sliding_attention" else None for kind in kinds] or [None] * cfg.num_hidden_layers


def _rotary(inner, hidden: torch.Tensor, positions: torch.Tensor, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(cos, sin) [1, N, d]`` from the model's rotary module (one table per layer type)."""
    kinds = list(getattr(config, "layer_types", None) or ())
    if not kinds or hasattr(inner.rotary_emb, "inv_freq"):
        table = inner.rotary_emb(hidden, positions[None])
        return [table] * config.num_hidden_layers
    tables = {kind: inner.rotary_emb(hidden, positions[None], kind) for kind in set(kinds)}
    return [tables[kind] for kind in kinds[: config.num_hidden_layers]]


def _project(attn, x: torch.Tensor, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q/K/V ``[1, heads, n, d]`` of ``x [1, n, H]`` before RoPE (q/k norms applied where the model has them)."""
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _residual(layer, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer after attention: residual + MLP (Gemma's sandwich norms where present)."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        hidden = hidden + layer.post_attention_layernorm(attn_out)
        return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    hidden = hidden + attn_out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _query_attention(attn, q: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor | None = None,
                     window: int | None = None) -> torch.Tensor:
    """Mean attention weight ``[N]`` (float32) of the query tokens ``q [1, heads, n, d]`` on context keys
    ``[N, kv_heads, d]`` (softmax over the context only; with a sliding ``window``, only the keys inside each query
    position's ``q_pos`` window count)."""
    k = keys.transpose(0, 1).float()  # [kv_heads, N, d]
    qf = q[0].float().reshape(k.shape[0], -1, q.shape[-1])  # [kv_heads, groups * n, d]
    scores = qf @ k.transpose(1, 2) * attn.scaling
    if window is not None and q_pos is not None:
        inside = torch.arange(k.shape[1], device=k.device)[None, :] > (q_pos[:, None] - window)  # [n, N]
        groups = qf.shape[1] // q_pos.shape[0]
        scores = scores.masked_fill(~inside.repeat(groups, 1)[None], float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=(0, 1))
    probs = torch.softmax(scores, dim=-1)
    return probs.mean(dim=(0, 1))


def _stage(kv: torch.Tensor, chunk_kvs: Sequence[torch.Tensor],
           inv_freq: torch.Tensor | Sequence[torch.Tensor]) -> list | None:
    """Write the chunks, re-rotated to their places, into ``kv[:, :, :n_ctx]``.

    Per layer: one copy per chunk, then one rotation of every shifted key (per-token angles computed once). Host
    chunks for a CUDA ``kv`` are copied on a side stream, so loading overlaps the recompute of earlier layers (the
    paper's pipelining); the per-layer events are returned for the compute stream to wait on. Otherwise the copy is
    done now and None is returned.
    """
    pipelined = kv.is_cuda and all(not c.is_cuda for c in chunk_kvs)
    lengths = [int(c.shape[2]) for c in chunk_kvs]
    first, n_ctx = lengths[0], sum(lengths)
    # angle of each shifted token: its chunk's start position times the frequencies (as rerotate computes it)
    starts = torch.repeat_interleave(torch.tensor([0] + lengths[:-1]).cumsum(0), torch.tensor(lengths))[first:]
    per_layer = [inv_freq] * kv.shape[0] if isinstance(inv_freq, torch.Tensor) else list(inv_freq)
    angles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per distinct table (one, or one per layer type)
    tables = []
    for inv in per_layer:
        if id(inv) not in angles:
            freqs = starts.to(device=kv.device, dtype=torch.float32)[:, None] * inv.to(kv.device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [shifted tokens, 1, rot]
            if emb.shape[-1] > kv.shape[-1]:
                raise InvalidRequest(f"{inv.shape[0]} RoPE frequencies do not fit head_dim {kv.shape[-1]}")
            angles[id(inv)] = (emb.cos(), emb.sin())
        tables.append(angles[id(inv)])
    stream = torch.cuda.Stream(kv.device) if pipelined else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(kv.device))
        for cos, sin in angles.values():
            cos.record_stream(stream)  # made on the compute stream, read on the side stream
            sin.record_stream(stream)
    events = []
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        for layer in range(kv.shape[0]):
            start = 0
            for chunk, n in zip(chunk_kvs, lengths):
                kv[layer, :, start:start + n].copy_(chunk[layer], non_blocking=pipelined)
                start += n
            if n_ctx > first:
                cos, sin = tables[layer]
                keys = kv[layer, 0, first:n_ctx, :, :cos.shape[-1]]
                k = keys.float()
                keys.copy_(k * cos + _rotate_half(k) * sin)
            if stream is not None:
                events.append(torch.cuda.Event())
                events[-1].record(stream)
    return events or None


@torch.no_grad()
def blend(model, chunk_kvs: Sequence[torch.Tensor], input_ids: Sequence[int] | torch.Tensor, *,
          ratio: float = 0.15, method: str = "kdn", score: str | None = None, first_layer: int | None = None,
          start_ratio: float | None = None, steps: int | None = None, plan: Schedule | None = None,
          sink: int | None = None, tail: int = 0, quota: bool = False, look_from: int = 0,
          look_reduce: str = "mean", look_ctx: bool = False, look_rest: bool = False, look_heads: str = "mean",
          look_last: bool = False) -> BlendResult:
    """Blend ``chunk_kvs`` (position-0 KV of consecutive chunks) under ``input_ids`` (all prompt tokens: the
    chunks' tokens, then the query's) and recompute the tokens that matter.

    ``ratio`` is the share of context tokens recomputed through the last layer (1.0 is a full prefill);
    ``method`` is ``kdn``, ``gradual``, ``single`` or ``lookahead`` (see :mod:`kdn.blend.select`); ``score`` the rule
    (default: the method's, :data:`kdn.blend.select.DEFAULT_SCORE`). Query tokens (everything after the chunks)
    are always recomputed. ``sink`` (default: the method's, :data:`kdn.blend.select.DEFAULT_SINK`) forces the
    first ``sink`` tokens of every chunk and ``tail`` the last ``tail`` context tokens through every layer, *on top
    of* the ratio (the cost shows in ``compute_fraction``); ``quota`` splits each selection's budget over the
    chunks by length instead of ranking the whole context at once. Returns the blended KV and the last logits.

    ``lookahead`` first runs a preview (:func:`_preview`: the query tokens alone through every layer over the reused
    chunk KV) and ranks by its attention on each context token: ``look_reduce`` (``mean`` / ``max``) over layers
    ``look_from`` and deeper (``look_rest``: and no shallower than the selection layer), softmax over context and
    query (``look_ctx``: renormalized over the context), per layer the mean over query tokens (``look_last``: the
    last one only) and the ``look_heads`` (``mean`` / ``max``) over heads. Its query rows count in
    ``compute_fraction``.
    """
    windows = _check_layers(model)
    device, dtype = model.device, model.dtype
    inner = model.model
    config = text_config(model.config)
    layers = inner.layers[: config.num_hidden_layers]
    ids = torch.as_tensor(input_ids, device=device).reshape(1, -1)
    n_total = ids.shape[1]
    inv_freq = layer_inv_freqs(model, device=device)
    if not chunk_kvs:
        raise InvalidRequest("no chunks to blend")
    n_ctx = sum(int(c.shape[2]) for c in chunk_kvs)
    if n_ctx >= n_total:
        raise InvalidRequest(f"the query is empty: {n_total} tokens, {n_ctx} of them in chunks")
    if any(c.shape[0] != len(layers) for c in chunk_kvs):
        raise InvalidRequest(f"chunk KV has {chunk_kvs[0].shape[0]} layers, the model {len(layers)}")
    score = score or DEFAULT_SCORE.get(method, "value")
    if score not in SCORES:
        raise InvalidRequest(f"unknown blend score {score!r}; use one of {', '.join(SCORES)}")
    if score.endswith("look") and method != "lookahead":
        raise InvalidRequest(f"score {score!r} needs method='lookahead' (the preview pass)")
    sink = DEFAULT_SINK.get(method, 0) if sink is None else sink
    plan = plan or schedule(len(layers), ratio, method, first_layer=first_layer, start_ratio=start_ratio,
                            steps=steps)
    shape = chunk_kvs[0].shape
    kv = torch.empty((len(layers), 2, n_total, shape[3], shape[4]), dtype=dtype, device=device)
    on_host = device.type == "cuda" and all(not c.is_cuda for c in chunk_kvs)
    events = _stage(kv, [c if on_host else c.to(device) for c in chunk_kvs], inv_freq)

    hidden = inner.embed_tokens(ids)  # [1, N, H]
    positions = torch.arange(n_total, device=device)
    rotary = _rotary(inner, hidden, positions, config)  # per layer: (cos, sin) [1, N, d]
    sel = positions  # token positions still being recomputed (sorted)
    lengths = [int(c.shape[2]) for c in chunk_kvs]
    starts = torch.tensor([0] + lengths, device=device).cumsum(0)
    chunk_of = torch.bucketize(positions, starts[1:], right=True)  # chunk index of each position (n = query)
    forced = positions >= n_ctx - tail if tail > 0 else torch.zeros(n_total, dtype=torch.bool, device=device)
    if sink > 0:
        forced |= (positions - starts[chunk_of.clamp_max(len(chunk_kvs) - 1)]) < sink
    forced &= positions < n_ctx
    # Context positions come first in ``sel`` (sorted; the query follows), and every forced token stays selected,
    # so the counts below are known on the host: the loop never waits for the GPU to find out what it kept.
    n_forced, n_sel_ctx = int(forced.sum()), n_ctx
    look = None
    if method == "lookahead" and all(plan.keep(layer, n_ctx) >= n_ctx for layer in plan.ratios):
        plan = Schedule({}, plan.first_layer)  # nothing to drop (ratio 1): no preview, a plain prefill
    elif method == "lookahead":
        look = _preview(layers, hidden[:, n_ctx:], [(c[:, n_ctx:], s[:, n_ctx:]) for c, s in rotary], kv, n_ctx,
                        events, ctx_only=look_ctx, heads_max=look_heads == "max", last_only=look_last,
                        windows=windows)
    extra_rows = n_total - n_ctx if look is not None else 0
    base = score.removesuffix("-look").removesuffix("-attn")
    recomputed: list[int] = []
    for idx, layer in enumerate(layers):
        if events:
            torch.cuda.current_stream(device).wait_event(events[idx])
        keep_ctx = plan.keep(idx, n_ctx)
        if keep_ctx is not None and (score == "look" or (look is not None and idx == 0)):
            # rank by the preview alone before the layer runs (dropped tokens keep the reused K/V; at layer 0 these
            # are exact and no deviation shows, so a lookahead selecting there ranks by the preview whatever its score)
            ctx_pos = sel[:n_sel_ctx]
            w = preview_weight(look, max(look_from, idx) if look_rest else look_from, reduce=look_reduce)[ctx_pos]
            picked = _pick(w, keep_ctx, forced[ctx_pos], chunk_of[ctx_pos], quota, lengths, n_forced)
            keep_local = torch.cat((picked, torch.arange(n_sel_ctx, sel.shape[0], device=device)))
            hidden, sel, n_sel_ctx = hidden[:, keep_local], sel[keep_local], picked.shape[0]
            keep_ctx = None
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n = x.shape[1]
        q, k, v = _project(attn, x, attn.head_dim)
        cos_all, sin_all = rotary[idx]
        cos, sin = cos_all[:, sel].unsqueeze(1), sin_all[:, sel].unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_rows, v_rows = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [n, kv_heads, d]
        recomputed.append(n + extra_rows)
        if keep_ctx is not None:
            ctx_pos = sel[:n_sel_ctx]
            dev = deviation(k_rows[:n_sel_ctx], v_rows[:n_sel_ctx], kv[idx, 0, ctx_pos], kv[idx, 1, ctx_pos], base)
        kv[idx, 0].index_copy_(0, sel, k_rows)
        kv[idx, 1].index_copy_(0, sel, v_rows)
        if keep_ctx is not None:
            if "-attn" in score:
                w = _query_attention(attn, q[:, :, n_sel_ctx:], kv[idx, 0, :n_ctx], sel[n_sel_ctx:],
                                     windows[idx])[ctx_pos]
                dev = dev / dev.mean().clamp_min(1e-12) * (w / w.mean().clamp_min(1e-12))
            if score.endswith("-look"):
                w = preview_weight(look, max(look_from, idx) if look_rest else look_from, reduce=look_reduce)
                w = w[ctx_pos]
                dev = dev / dev.mean().clamp_min(1e-12) * (w / w.mean().clamp_min(1e-12))
            picked = _pick(dev, keep_ctx, forced[ctx_pos], chunk_of[ctx_pos], quota, lengths, n_forced)
            keep_local = torch.cat((picked, torch.arange(n_sel_ctx, sel.shape[0], device=device)))
            q, hidden, sel, n_sel_ctx = q[:, :, keep_local], hidden[:, keep_local], sel[keep_local], picked.shape[0]
        keys = kv[idx, 0].transpose(0, 1).unsqueeze(0)
        values = kv[idx, 1].transpose(0, 1).unsqueeze(0)
        out = attend(q, keys, values, sel, attn.scaling, window=windows[idx])  # [1, heads, n, d], causal
        hidden = _residual(layer, hidden, attn.o_proj(out.transpose(1, 2).reshape(1, q.shape[2], -1)))
    last = inner.norm(hidden[:, -1:])
    logits = model.lm_head(last)[:, -1]
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    selected = sel[:n_sel_ctx]
    return BlendResult(kv=kv, logits=logits.float(), selected=selected, num_context=n_ctx, recomputed=recomputed)


@torch.no_grad()
def _preview(layers, hidden: torch.Tensor, rotary: list, kv: torch.Tensor, n_ctx: int,
             events: list | None, *, ctx_only: bool = False, heads_max: bool = False,
             last_only: bool = False, windows: list | None = None) -> torch.Tensor:
    """The lookahead preview: the query tokens alone (``hidden [1, n_q, H]``, per layer rotary ``(cos, sin)
    [1, n_q, d]``; ``windows``: each layer's sliding window or None)
    through every layer over the reused context KV ``kv[:, :, :n_ctx]`` (their own K/V go to ``kv``'s query rows,
    which the real pass overwrites). Returns their attention weight on each context token per layer,
    ``[layers, n_ctx]`` float32: softmax over context and query (``ctx_only``: renormalized over the context), mean
    over query tokens (``last_only``: the last one), mean over heads (``heads_max``: max)."""
    n_q = hidden.shape[1]
    n_keys = n_ctx + n_q
    device = hidden.device
    causal = torch.ones(n_q, n_keys, dtype=torch.bool, device=device)
    causal[:, n_ctx:] = torch.ones(n_q, n_q, dtype=torch.bool, device=device).tril()
    q_pos = torch.arange(n_ctx, n_keys, device=device)
    out = torch.empty(len(layers), n_ctx, dtype=torch.float32, device=device)
    for idx, layer in enumerate(layers):
        window = windows[idx] if windows else None
        mask = causal if window is None else causal & (torch.arange(n_keys, device=device)[None, :]
                                                        > q_pos[:, None] - window)
        cos, sin = rotary[idx][0].unsqueeze(1), rotary[idx][1].unsqueeze(1)
        if events:
            torch.cuda.current_stream(device).wait_event(events[idx])
        attn = layer.self_attn
        hd = attn.head_dim
        x = layer.input_layernorm(hidden)
        q, k, v = _project(attn, x, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv[idx, 0, n_ctx:] = k[0].transpose(0, 1)
        kv[idx, 1, n_ctx:] = v[0].transpose(0, 1)
        keys = kv[idx, 0, :n_keys].transpose(0, 1).float()  # [kv_heads, N, d]
        values = kv[idx, 1, :n_keys].transpose(0, 1).float()
        kvh, heads = keys.shape[0], q.shape[1]
        qf = q[0].float().reshape(kvh, -1, hd)  # [kv_heads, groups * n_q, d]
        scores = (qf @ keys.transpose(1, 2) * attn.scaling).view(kvh, heads // kvh, n_q, n_keys)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        ctx = probs[..., :n_ctx]
        if ctx_only:
            ctx = ctx / ctx.sum(-1, keepdim=True).clamp_min(1e-12)
        per_head = (ctx[:, :, -1] if last_only else ctx.mean(2)).reshape(heads, n_ctx)
        out[idx] = per_head.amax(0) if heads_max else per_head.mean(0)
        o = (probs.reshape(kvh, -1, n_keys) @ values).reshape(heads, n_q, hd).to(hidden.dtype)
        hidden = _residual(layer, hidden, attn.o_proj(o.transpose(0, 1).reshape(1, n_q, -1)))
    return out


def _pick(dev: torch.Tensor, keep: int, forced: torch.Tensor, chunk: torch.Tensor, quota: bool,
          lengths: list[int], n_forced: int) -> torch.Tensor:
    """Local indices (sorted) of the context tokens kept: every ``forced`` one (``n_forced`` of them) plus ``keep``
    of the others by ``dev`` — over the whole context, or (``quota``) ``keep`` split over the chunks by length."""
    dev = dev.masked_fill(forced, float("inf"))
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
