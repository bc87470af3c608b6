"""Hugging Face helpers for profiling: load a causal LM, prefill a text, measure KV importance (Fisher)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from codec.errors import InvalidInput

__all__ = ["load_model", "rope_parameters", "prefill_kv", "kv_and_fisher", "cache_from_kv", "continuation_logits",
           "single_group_kl"]


def load_model(model, tokenizer=None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, model_id)`` from a loaded model, a model folder or a ``.gguf`` file (offline)."""
    if not isinstance(model, (str, Path)):
        if tokenizer is None:
            raise InvalidInput("profile_model: pass tokenizer= with a loaded model")
        return model.eval(), tokenizer, getattr(model.config, "_name_or_path", "") or model.config.model_type
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kwargs = {}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    tok = tokenizer or AutoTokenizer.from_pretrained(str(path), **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    return lm, tok, str(model)


def rope_parameters(model) -> tuple[np.ndarray, int] | None:
    """``(inv_freq, max_position)`` of a Hugging Face model's rotary embedding, or None if it has none."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_position = int(getattr(cfg, "max_position_embeddings", 0) or 32768)
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.dim() == 1:
            return inv.detach().double().cpu().numpy(), max_position
    return None


def cache_from_kv(kv: torch.Tensor, requires_grad: bool = False):
    """A ``DynamicCache`` holding ``kv`` (``[layers, 2, tokens, heads, dim]``); returns ``(cache, leaf)``."""
    from transformers import DynamicCache

    leaf = kv.float().permute(0, 1, 3, 2, 4).contiguous()  # [L, 2, H, T, D]
    if requires_grad:
        leaf.requires_grad_(True)
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(leaf[layer, 0][None], leaf[layer, 1][None], layer)
    return cache, leaf


@torch.no_grad()
def prefill_kv(model, ids: torch.Tensor) -> torch.Tensor:
    """KV ``[layers, 2, tokens, kv_heads, head_dim]`` (float32) of prefilling ``ids`` (1-D)."""
    cache = model(ids[None], use_cache=True).past_key_values
    layers = cache.layers if hasattr(cache, "layers") else None
    if layers is None:
        raise InvalidInput("profile_model needs a transformers version whose caches expose .layers")
    kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in layers])  # [L, 2, H, T, D]
    return kv.permute(0, 1, 3, 2, 4).float().contiguous()


def continuation_logits(model, kv: torch.Tensor, ids: torch.Tensor, requires_grad: bool = False):
    """Logits of ``ids`` teacher-forced after the cache ``kv``; returns ``(logits, leaf)``."""
    cache, leaf = cache_from_kv(kv, requires_grad)
    t = kv.shape[2]
    pos = torch.arange(t, t + len(ids))[None]
    out = model(ids[None], past_key_values=cache, position_ids=pos, cache_position=pos[0])
    return out.logits[0].float(), leaf


def kv_and_fisher(model, tokenizer, text: str, *, context: int, continuation: int, samples: int, seed: int = 0):
    """KV of the first ``context`` tokens and its diagonal Fisher ``[L, 2, T, C]`` (None if ``samples == 0``).

    The Fisher is estimated from ``samples`` label draws from the model's own predictions over the next
    ``continuation`` tokens (sum of log-likelihoods, squared gradient w.r.t. each cached value).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < context + continuation or context < 2:
        raise InvalidInput(f"profile text has {len(ids)} tokens, needs {context} + {continuation}")
    kv = prefill_kv(model, ids[:context])
    cont = ids[context:context + continuation]
    if not samples:
        return kv, None, cont
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(kv.shape[0], 2, kv.shape[3], kv.shape[2], kv.shape[4])
    for _ in range(samples):
        logits, leaf = continuation_logits(model, kv, cont, requires_grad=True)
        logp = torch.log_softmax(logits, -1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        (-logp.gather(1, y).sum()).backward()
        acc += leaf.grad.detach() ** 2
        model.zero_grad(set_to_none=True)
    fisher = (acc / samples / len(cont)).permute(0, 1, 3, 2, 4)  # [L, 2, T, H, D]
    return kv, np.ascontiguousarray(fisher.reshape(kv.shape[0], 2, kv.shape[2], -1).numpy()), cont


@torch.no_grad()
def single_group_kl(model, profile, level: str, kv: torch.Tensor, cont: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """``[L, 2]``: mean KL of the continuation when only that layer's keys or values go through ``level``."""
    from codec.base import KVShape
    from codec.cachegen import CacheGenCodec

    layout = KVShape(profile.num_layers, profile.num_kv_heads, profile.head_dim, "bfloat16")
    codec = type("_Level", (CacheGenCodec,), {"name": f"cachegen-{level}", "level": level})(layout, profile)
    kv = kv.to(torch.bfloat16)
    ref = torch.log_softmax(continuation_logits(model, kv, cont)[0], -1)
    decoded = torch.cat([torch.cat([codec.decode(codec.encode(kv[i:i + 1, :, s:s + chunk].contiguous(), layer_start=i),
                                                 1, min(chunk, kv.shape[2] - s), meta=codec.meta(), layer_start=i)
                                    for s in range(0, kv.shape[2], chunk)], dim=2) for i in range(kv.shape[0])])
    out = np.zeros((kv.shape[0], 2))
    for layer in range(kv.shape[0]):
        for half in range(2):
            trial = kv.clone()
            trial[layer, half] = decoded[layer, half]
            got = torch.log_softmax(continuation_logits(model, trial, cont)[0], -1)
            out[layer, half] = (ref.exp() * (ref - got)).sum(-1).mean().item()
    return out
