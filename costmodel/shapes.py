"""Model shapes: the KV bytes per token, and what the FLOP estimate of prefill/decode time needs.

``kv_bytes_per_token = num_layers × 2 (K and V) × num_kv_heads × head_dim × dtype bytes``.
Sizes are in bytes; the cost model reports decimal GB (1 GB = 10⁹ B), as cloud price lists do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodel.errors import InvalidInput

__all__ = ["ModelShape", "MODELS", "DTYPE_BYTES", "dtype_bytes", "get_model", "find_model_by_dims"]

#: Bytes per KV element; short aliases accepted.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
    "float8": 1, "fp8": 1, "int8": 1,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype``; :class:`InvalidInput` if unknown."""
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise InvalidInput(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of one model replica (all layers, all KV heads)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    num_heads: int | None = None
    """Query heads (for attention FLOPs); defaults to ``num_kv_heads``."""
    num_params: float | None = None
    """Parameter count (for the FLOP estimate); ``None`` if unknown."""
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or self.num_heads <= 0):
            raise InvalidInput(f"model {self.name!r}: num_heads must be a positive integer, got {self.num_heads!r}")
        if self.num_params is not None and not (math.isfinite(self.num_params) and self.num_params > 0):
            raise InvalidInput(f"model {self.name!r}: num_params must be positive, got {self.num_params!r}")
        dtype_bytes(self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """layers × 2 × kv_heads × head_dim × dtype bytes."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)

    @property
    def q_dim(self) -> int:
        """Width of the attention (query heads × head_dim)."""
        return (self.num_heads or self.num_kv_heads) * self.head_dim

    def kv_bytes(self, tokens: int) -> int:
        """KV bytes of ``tokens`` tokens."""
        return self.kv_bytes_per_token * tokens


def _m(name: str, layers: int, heads: int, kv: int, hd: int, params: float, repo: str) -> ModelShape:
    return ModelShape(name, layers, kv, hd, num_heads=heads, num_params=params, source=f"hf.co/{repo} config.json")


#: Common shapes, from each model's Hugging Face ``config.json`` (bf16 KV).
MODELS: dict[str, ModelShape] = {m.name: m for m in (
    _m("llama-2-7b", 32, 32, 32, 128, 6.74e9, "meta-llama/Llama-2-7b-hf"),
    _m("llama-3-8b", 32, 32, 8, 128, 8.03e9, "meta-llama/Meta-Llama-3-8B"),
    _m("llama-3-70b", 80, 64, 8, 128, 70.6e9, "meta-llama/Meta-Llama-3-70B"),
    _m("mistral-7b", 32, 32, 8, 128, 7.24e9, "mistralai/Mistral-7B-v0.3"),
    _m("qwen2.5-7b", 28, 28, 4, 128, 7.62e9, "Qwen/Qwen2.5-7B"),
    _m("smollm2-135m", 30, 9, 3, 64, 1.35e8, "HuggingFaceTB/SmolLM2-135M"),
)}

_ALIASES = {"llama-7b": "llama-2-7b", "llama2-7b": "llama-2-7b", "llama3-8b": "llama-3-8b",
            "llama-3.1-8b": "llama-3-8b", "llama3-70b": "llama-3-70b", "llama-3.1-70b": "llama-3-70b"}


def get_model(name: str) -> ModelShape:
    """The catalog shape called ``name`` (case-insensitive, a few aliases such as ``llama-7b``)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return MODELS[key]
    except KeyError:
        raise InvalidInput(f"unknown model {name!r}; known: {', '.join(MODELS)} "
                             "(or give --layers/--kv-heads/--head-dim)") from None


def find_model_by_dims(num_layers: int, num_kv_heads: int, head_dim: int) -> ModelShape | None:
    """The first catalog model with these KV dimensions, or ``None``."""
    for shape in MODELS.values():
        if (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (num_layers, num_kv_heads, head_dim):
            return shape
    return None
