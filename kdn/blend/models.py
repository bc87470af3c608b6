"""Which Hugging Face model families KDN can reuse KV for exactly (prefix reuse and CacheBlend share the rule)."""

from __future__ import annotations

from kdn.errors import InvalidRequest

__all__ = ["SUPPORTED_MODEL_TYPES", "BLEND_MODEL_TYPES", "check_supported", "check_blend_supported", "text_config"]

#: Decoder-only RoPE + (G)QA families whose DynamicCache holds plain per-layer K/V tensors.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
#: Families :func:`kdn.blend.blend` can run (on KV it is handed): the above plus Gemma 3 text models (sliding and
#: full attention layers, q/k norms, sandwich norms). Storing Gemma 3 KV in KDN (layouts, the prefix connector)
#: is not supported yet, so these are blend-only.
BLEND_MODEL_TYPES = SUPPORTED_MODEL_TYPES | {"gemma3_text"}


def text_config(config):
    """The text model's config of a (possibly multimodal) Hugging Face config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(config) -> None:
    """Raise :class:`InvalidRequest` unless prefix KV of this model can be stored and reused exactly.

    Supported: Llama-, Mistral- and Qwen2-style decoder-only models (RoPE, MHA/GQA), including a uniform sliding
    window (the cache keeps every token and the model's sliding mask hides the old ones, so reuse stays exact).
    Refused: encoder-decoder models, other families (MLA, SSM/hybrid, ...), and models that mix sliding and full
    attention layers (layer-type-aware caching is not implemented).
    """
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", "") or getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        raise InvalidRequest(f"KDN HF connector: encoder-decoder models ({model_type}) are not supported")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidRequest(f"KDN HF connector: model type {model_type!r} is not supported; supported: "
                             f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (decoder-only RoPE attention)")
    if getattr(cfg, "kv_lora_rank", None):
        raise InvalidRequest("KDN HF connector: multi-head latent attention (MLA) is not supported")
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if len(kinds) > 1:
        raise InvalidRequest(f"KDN HF connector: hybrid attention layers {sorted(kinds)} are not supported "
                             "(layer-type-aware caching is not implemented)")
    if kinds - {"full_attention", "sliding_attention"}:
        raise InvalidRequest(f"KDN HF connector: layer type {sorted(kinds)} is not supported")


def check_blend_supported(config) -> None:
    """Raise :class:`InvalidRequest` unless :func:`kdn.blend.blend` can run this model: a
    :data:`SUPPORTED_MODEL_TYPES` model (see :func:`check_supported`), or a Gemma 3 text model (sliding-window and
    full-attention layers; the blend honours each layer's window and RoPE table)."""
    cfg = text_config(config)
    if getattr(cfg, "model_type", "") != "gemma3_text":
        check_supported(config)
        return
    if getattr(cfg, "attn_logit_softcapping", None):
        raise InvalidRequest("blend: attention logit soft-capping is not supported")
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        raise InvalidRequest(f"blend: layer type {sorted(kinds)} is not supported")
