"""Hugging Face cache objects <-> KDN's KV convention, and the model checks that decide what is supported.

KDN keeps KV as ``[layers, 2, tokens, kv_heads, head_dim]`` (post-RoPE keys); a transformers ``DynamicCache`` keeps,
per layer, keys and values of shape ``[batch, kv_heads, tokens, head_dim]``. Works with the per-layer cache API of
transformers >= 4.56 (``cache.layers``) and the older ``key_cache``/``value_cache`` lists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from kdn import KVLayout
from kdn.blend.models import SUPPORTED_MODEL_TYPES, check_supported
from kdn.errors import InvalidRequest

__all__ = ["SUPPORTED_MODEL_TYPES", "check_supported", "layout_for", "kv_from_cache", "cache_from_kv",
           "KDNPrefixCache", "cache_kwarg", "PrefixLoadError"]


_TORCH_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class PrefixLoadError(RuntimeError):
    """A cached prefix could not be delivered mid-prefill (the caller recomputes without it)."""


def layout_for(model, *, model_id: str | None = None, revision: str | None = None,
               check: Callable[[object], None] = check_supported) -> KVLayout:
    """The KDN layout of ``model``'s KV (``check`` raises for unsupported configs first).

    ``model_id`` defaults to ``config._name_or_path``; a model without one (random weights built from a config)
    must be given a ``model_id`` that names its weights, or two different models could share cached KV.
    """
    config = model.config
    check(config)
    name = model_id or getattr(config, "_name_or_path", "")
    if not name:
        raise InvalidRequest("model has no name (built from a config?): pass model_id= naming its weights")
    dtype = _TORCH_NAMES.get(model.dtype)
    if dtype is None:
        raise InvalidRequest(f"KV dtype {model.dtype} is not supported")
    layout = KVLayout.from_hf_config(config, model_id=name, dtype=dtype)
    rev = revision if revision is not None else (getattr(config, "_commit_hash", None) or "")
    if rev:
        layout = KVLayout.from_dict({**layout.to_dict(), "revision": rev})
    return layout


def _layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v, *_ in cache]
    raise InvalidRequest(f"unsupported cache object {type(cache).__name__}")


def kv_from_cache(cache, num_tokens: int | None = None) -> torch.Tensor:
    """Copy the first ``num_tokens`` tokens (default all) of a batch-1 cache into one KDN KV tensor.

    Returns a new contiguous tensor ``[layers, 2, tokens, kv_heads, head_dim]`` on the cache's device.
    """
    layers = _layer_tensors(cache)
    if not layers or layers[0][0] is None:
        raise InvalidRequest("cache is empty")
    k0 = layers[0][0]
    if k0.dim() != 4 or k0.shape[0] != 1:
        raise InvalidRequest(f"expected batch-1 cache tensors [1, heads, tokens, dim], got {tuple(k0.shape)}")
    total = k0.shape[2]
    n = total if num_tokens is None else num_tokens
    if not 0 < n <= total:
        raise InvalidRequest(f"cache holds {total} tokens, asked for {n}")
    out = torch.empty((len(layers), 2, n, k0.shape[1], k0.shape[3]), dtype=k0.dtype, device=k0.device)
    for i, (k, v) in enumerate(layers):
        if k.shape[2] < n:
            raise InvalidRequest(f"layer {i} holds {k.shape[2]} tokens, fewer than {n}")
        out[i, 0].copy_(k[0, :, :n].transpose(0, 1))
        out[i, 1].copy_(v[0, :, :n].transpose(0, 1))
    return out


def _per_layer(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, tokens, heads, dim]`` -> key and value views ``[1, heads, tokens, dim]``."""
    return kv[0].transpose(0, 1).unsqueeze(0), kv[1].transpose(0, 1).unsqueeze(0)


def cache_from_kv(kv: torch.Tensor, config=None) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv`` (``[layers, 2, tokens, kv_heads, head_dim]``), ready for ``generate``.

    ``config`` (the model's), when given, is checked against the tensor's shape. Layers are plain full-length
    layers even for sliding-window models (exact, see :func:`check_supported`).
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise InvalidRequest(f"KV must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
    if config is not None:
        check_supported(config)
        layout = KVLayout.from_hf_config(config, model_id="check")
        if (kv.shape[0], kv.shape[3], kv.shape[4]) != (layout.num_layers, layout.num_kv_heads, layout.head_dim):
            raise InvalidRequest(f"KV shape {tuple(kv.shape)} does not match the model's "
                                 f"{layout.num_layers} layers x {layout.num_kv_heads} heads x {layout.head_dim}")
    cache = DynamicCache()
    for i in range(kv.shape[0]):
        cache.update(*_per_layer(kv[i]), i)
    return cache


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes the cache (``cache`` in 5.x, else
    ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class KDNPrefixCache(DynamicCache):
    """A ``DynamicCache`` whose first ``prefix_len`` tokens arrive layer by layer during the suffix prefill.

    Until layer ``i`` is first updated it reports ``prefix_len`` cached tokens (so positions and masks are right);
    its first ``update`` blocks on ``fetch(i)`` — which returns that layer's prefix KV ``[2, tokens, heads, dim]``
    — installs it, then appends the new tokens. So layer ``i``'s attention waits only for layer ``i``'s KV while
    later layers keep loading. ``fetch`` may raise :class:`PrefixLoadError`; the forward pass then fails and the
    caller recomputes without the prefix. After the forward, the object is an ordinary ``DynamicCache``.
    """

    def __init__(self, fetch: Callable[[int], torch.Tensor], prefix_len: int, num_layers: int) -> None:
        super().__init__()
        self._fetch = fetch
        self._prefix_len = prefix_len
        self._pending = set(range(num_layers)) if prefix_len else set()

    @property
    def pending_layers(self) -> int:
        return len(self._pending)

    def _install(self, layer_idx: int) -> None:
        key, value = _per_layer(self._fetch(layer_idx))
        self._pending.discard(layer_idx)
        super().update(key, value, layer_idx)

    def materialize(self) -> None:
        """Wait for and install every layer not yet loaded."""
        for i in sorted(self._pending):
            self._install(i)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        if (layer_idx or 0) in self._pending:
            return self._prefix_len
        return super().get_seq_length(layer_idx or 0)

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        # 5.x: (query_length: int, layer_idx); 4.56+: (cache_position: Tensor, layer_idx).
        query = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        layer_idx = args[1] if len(args) > 1 else kwargs.get("layer_idx", 0)
        if layer_idx in self._pending:
            q = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
            return self._prefix_len + q, 0
        return super().get_mask_sizes(*args, **kwargs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self._pending:
            self._install(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
