"""What vLLM's own code declares about its GPU paged KV caches, dumped as JSON (run in the environment with vLLM).

Usage (e.g. ``.venv-engines``; the CPU build ships the GPU backend classes)::

    python -m connectors.vllm.layouts OUT.json

vLLM 0.32 gives every attention layer one *logical* ``[num_blocks, num_kv_heads, block_size, K|V]`` view (the
last axis holds the ``head_size`` keys then the ``head_size_v`` values of one token and head) over one shared
int8 backing buffer; the physical order of ``[layer, block, head, token, content]`` is the model-wide
``KVCacheLayout`` (``LBNHC`` = the old "NHD", ``LBHNC`` = "HND", ``BLHNC`` = blocks outermost with every layer's
page inside a block, ...). Each backend declares which layouts its kernels consume
(``supported_kv_cache_layouts``; FlashInfer on SM100 only ``LBHNC``/``BLHNC``, FlexAttention only ``LBNHC``); the
KV cache groups of a hybrid model (full attention + sliding window, "Jenga") alias the same buffer, and each
group has its own block table.

This module asks vLLM itself — ``get_supported_kv_cache_layouts``, ``get_kv_cache_groups``,
``get_kv_cache_config_from_groups`` and the worker's ``allocate_kv_cache`` — and records, per backend, layout,
block size and model shape, every layer view's shape, strides and storage offset, the buffer size and the
groups. ``tests/connectors/test_vllm_layouts.py`` rebuilds those exact views with ``torch.as_strided`` (on CPU
and on CUDA) and round-trips blocks through :class:`~connectors.vllm.paged.StridedKVLayout`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

__all__ = ["dump"]

BACKENDS = {
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend",
    "FLASHINFER": "vllm.v1.attention.backends.flashinfer:FlashInferBackend",
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn:TritonAttentionBackend",
    "FLEX_ATTENTION": "vllm.v1.attention.backends.flex_attention:FlexAttentionBackend",
}
BLOCK_SIZES = (16, 32, 64)
#: (name, layers, kv heads of the whole model, head dim, sliding window of the odd layers or 0, tp size)
MODELS = (("llama-like", 4, 8, 64, 0, 1), ("llama-like-tp2", 4, 8, 64, 0, 2),
          ("gemma3-like", 6, 1, 256, 512, 1))


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a missing GPU-only package (``flashinfer``) as empty classes, so vLLM's FlashInfer backend class —
    whose layout declarations are plain Python — can be imported on a machine without it."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name, path=None, target=None):
        if name == self.package or name.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)

        def attr(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None})
        module.__getattr__ = attr  # type: ignore[method-assign]
        return module

    def exec_module(self, module) -> None:
        module.__path__ = []


def _backend(path: str):
    module, name = path.split(":")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ModuleNotFoundError as exc:
        if exc.name != "flashinfer":
            raise
        sys.meta_path.insert(0, _Stub("flashinfer"))
        return getattr(__import__(module, fromlist=[name]), name)


def _supported(backend) -> dict[str, list[str]]:
    """Layouts per GPU generation (FlashInfer's answer depends on the device capability)."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts

    out = {}
    original = current_platform.get_device_capability
    try:
        for sm, cap in (("sm90", DeviceCapability(9, 0)), ("sm100", DeviceCapability(10, 0))):
            current_platform.get_device_capability = lambda device_id=0, _c=cap: _c  # type: ignore[method-assign]
            out[sm] = [layout.name for layout in get_supported_kv_cache_layouts([backend])]
    finally:
        current_platform.get_device_capability = original  # type: ignore[method-assign]
    return out


def _allocation(layout_name: str, block_size: int, model: tuple) -> dict:
    import torch
    from vllm.config import CacheConfig, VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
    from vllm.v1.worker.utils import allocate_kv_cache

    _, layers, kv_heads, head_dim, window, tp = model
    heads = max(1, kv_heads // tp)
    config = VllmConfig(cache_config=CacheConfig(block_size=block_size))
    config.cache_config.kv_cache_layout = layout_name
    common = {"block_size": block_size, "num_kv_heads": heads, "head_size": head_dim, "dtype": torch.bfloat16}
    specs = {f"model.layers.{i}.self_attn.attn": (SlidingWindowSpec(**common, sliding_window=window)
                                                  if window and i % 6 != 5 else FullAttentionSpec(**common))
             for i in range(layers)}
    groups = get_kv_cache_groups(config, specs)
    page = heads * block_size * 2 * head_dim * 2
    kcc = get_kv_cache_config_from_groups(config, groups, page * layers * 12)
    caches = allocate_kv_cache(kcc, torch.device("cpu"), config.cache_config.get_resolved_kv_cache_layout())
    size = {t.size for t in kcc.kv_cache_tensors}.pop()
    return {"num_blocks": kcc.num_blocks, "buffer_bytes": size, "num_kv_heads": heads, "head_dim": head_dim,
            "groups": [{"kind": type(g.kv_cache_spec).__name__, "layers": list(g.layer_names),
                        "sliding_window": getattr(g.kv_cache_spec, "sliding_window", None)} for g in groups],
            "views": {name: {"shape": list(v.shape), "stride": list(v.stride()), "offset": v.storage_offset(),
                             "dtype": str(v.dtype).removeprefix("torch.")} for name, v in caches.items()}}


def dump() -> dict:
    """Every backend's declared layouts and, for each layout, block size and model, vLLM's own allocation."""
    import vllm

    backends = {name: _supported(_backend(path)) for name, path in BACKENDS.items()}
    layouts = sorted({name for per_sm in backends.values() for names in per_sm.values() for name in names})
    allocations = {f"{layout}/{bs}/{m[0]}": _allocation(layout, bs, m)
                   for layout in layouts for bs in BLOCK_SIZES for m in MODELS}
    return {"vllm": vllm.__version__, "backends": backends, "allocations": allocations}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(dump(), indent=1, sort_keys=True))
