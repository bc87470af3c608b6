"""KDN for Hugging Face transformers: prefix KV reuse with layer-pipelined loading.

Quick start::

    from connectors.hf import kdn_generate, layout_for
    from kdn.client import KDNClient

    client = KDNClient(layout_for(model), controller="127.0.0.1:7070")
    result = kdn_generate(model, tokenizer, prompt, client, max_new_tokens=64)
    print(result.text, result.stats.hit_tokens, result.ttft_s)

Lower-level pieces: :func:`prefill` (returns the filled cache and logits), :func:`kv_from_cache` /
:func:`cache_from_kv` (``DynamicCache`` <-> KDN's ``[layers, 2, tokens, kv_heads, head_dim]``), :func:`layout_for`,
:class:`KDNPrefixCache` and :class:`LayerLoader` (the pipelining), :class:`HostKVCache` (in-process pinned tier),
:func:`score` (prefill-only requests: one output token, one layer's KV; ``docs/prefill_only.md``).
See ``docs/connectors/hf.md``.
"""

from connectors.hf.cache import (
    SUPPORTED_MODEL_TYPES,
    KDNPrefixCache,
    PrefixLoadError,
    cache_from_kv,
    check_supported,
    kv_from_cache,
    layout_for,
)
from connectors.hf.generate import GenerateResult, PrefillResult, PrefillStats, kdn_generate, prefill, run_forward
from connectors.hf.loader import LayerLoader, LoadTrace
from connectors.hf.prefill_only import ScoreResult, score
from kdn.client.host_cache import HostKVCache

__all__ = [
    "kdn_generate", "prefill", "run_forward", "GenerateResult", "PrefillResult", "PrefillStats",
    "kv_from_cache", "cache_from_kv", "layout_for", "check_supported", "SUPPORTED_MODEL_TYPES",
    "KDNPrefixCache", "PrefixLoadError", "LayerLoader", "LoadTrace", "HostKVCache",
    "score", "ScoreResult",
]
