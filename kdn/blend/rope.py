"""Re-rotate stored keys to a new position: RoPE is a rotation, so a shift by ``delta`` is one more rotation.

Hugging Face Llama-style models apply RoPE with the *rotate_half* convention: the head dimension is split in two
halves ``(x1, x2)`` and pair ``i`` is ``(x1[i], x2[i])``, rotated by angle ``pos * inv_freq[i]``:
``k' = k * cos + rotate_half(k) * sin`` with ``cos``/``sin`` of ``cat(freqs, freqs)``. Rotations compose, so keys
computed at position ``p`` (already rotated by ``p * inv_freq``) become keys at ``p + delta`` after one more rotation
by ``delta * inv_freq``. This is exact for every RoPE type whose frequencies do not depend on the sequence length
(default, linear, llama3, yarn — their ``attention_scaling`` was applied once when the key was stored).
"""

from __future__ import annotations

import torch

from kdn.errors import InvalidRequest

__all__ = ["SHIFTABLE_ROPE_TYPES", "rope_inv_freq", "layer_inv_freqs", "rotate_half", "rerotate", "shift_kv"]

#: RoPE types whose frequencies are fixed, so a position shift is a pure rotation.
SHIFTABLE_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def rope_inv_freq(model_or_config, device: torch.device | str | None = None) -> torch.Tensor:
    """The inverse frequencies ``[head_dim // 2]`` (float32) of a model's RoPE.

    Given a model, they are read from its rotary module (so every frequency rule transformers knows is honoured);
    given a config, the default rule ``1 / theta ** (2i / d)`` is computed from ``rope_parameters['rope_theta']``
    (or the older ``rope_theta``). Raises :class:`InvalidRequest` for RoPE types whose frequencies change with the
    sequence length (``dynamic``, ``longrope``): a stored key cannot be shifted exactly there.
    """
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = _rope_type(config)
    if kind not in SHIFTABLE_ROPE_TYPES:
        raise InvalidRequest(f"RoPE type {kind!r} cannot be re-rotated exactly; supported: "
                             f"{', '.join(sorted(SHIFTABLE_ROPE_TYPES))}")
    rotary = getattr(getattr(model_or_config, "model", None), "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        inv = rotary.original_inv_freq if hasattr(rotary, "original_inv_freq") else rotary.inv_freq
        return inv.detach().to(device=device or inv.device, dtype=torch.float32)
    if kind != "default":
        raise InvalidRequest(f"RoPE type {kind!r}: pass the model (its rotary module knows the frequencies)")
    params = getattr(config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def layer_inv_freqs(model, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Each layer's RoPE inverse frequencies (float32). Models with one rotary table give :func:`rope_inv_freq`
    for every layer; models whose layer types rotate differently (Gemma 3: local base 10K on sliding layers, 1M on
    full ones) give each layer its type's table (``rotary_emb.<type>_inv_freq``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    types = list(getattr(config, "layer_types", None) or ())
    if rotary is None or hasattr(rotary, "inv_freq") or not types:
        return [rope_inv_freq(model, device=device)] * config.num_hidden_layers
    params = getattr(config, "rope_parameters", None) or {}
    tables = {}
    for kind in set(types):
        rope = (params.get(kind) or {}).get("rope_type", "default")
        if rope not in SHIFTABLE_ROPE_TYPES:
            raise InvalidRequest(f"RoPE type {rope!r} ({kind} layers) cannot be re-rotated exactly")
        inv = getattr(rotary, f"{kind}_original_inv_freq", None)
        inv = inv if inv is not None else getattr(rotary, f"{kind}_inv_freq", None)
        if inv is None:
            raise InvalidRequest(f"the rotary module has no frequencies for {kind} layers")
        tables[kind] = inv.detach().to(device=device or inv.device, dtype=torch.float32)
    return [tables[kind] for kind in types[: config.num_hidden_layers]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the last dimension (the HF convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor, token_dim: int = -3
             ) -> torch.Tensor:
    """``keys`` rotated by ``delta`` more positions (a new tensor in the keys' dtype; math in float32).

    ``keys`` has the head dimension last and tokens at ``token_dim`` (KDN's ``[..., tokens, heads, dim]`` by
    default). ``delta`` is one shift for all tokens or a 1-D tensor of per-token shifts.
    """
    dim = keys.shape[-1]
    rot = inv_freq.shape[0] * 2
    if rot > dim:
        raise InvalidRequest(f"{inv_freq.shape[0]} RoPE frequencies do not fit head_dim {dim}")
    delta_t = torch.as_tensor(delta, dtype=torch.float32, device=keys.device).reshape(-1)
    freqs = delta_t[:, None] * inv_freq.to(keys.device)[None, :]  # [tokens or 1, rot / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    # Broadcast [T, rot] to the keys' shape: tokens at token_dim, head dim last.
    td = token_dim % keys.dim()
    shape = [1] * keys.dim()
    shape[td], shape[-1] = emb.shape[0], rot
    cos, sin = emb.cos().reshape(shape), emb.sin().reshape(shape)
    k = keys.float()
    head, tail = k[..., :rot], k[..., rot:]
    out = head * cos + rotate_half(head) * sin
    if tail.shape[-1]:
        out = torch.cat((out, tail), dim=-1)
    return out.to(keys.dtype)


def shift_kv(kv: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """A copy of ``kv`` (``[layers, 2, tokens, heads, dim]``) with its keys moved ``delta`` positions later."""
    out = kv.clone()
    if delta:
        out[:, 0] = rerotate(kv[:, 0], delta, inv_freq, token_dim=-3)
    return out
