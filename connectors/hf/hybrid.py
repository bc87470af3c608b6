"""Prefix reuse for hybrid Hugging Face models (sliding-window plus full-attention layers, e.g. Gemma 3).

:class:`HFHybridClient` is a :class:`kdn.client.hybrid.HybridClient` that also knows which transformers models it
can serve exactly; :func:`kdn_generate` and :func:`prefill` take it in place of a ``KDNClient``::

    from connectors.hf import kdn_generate
    from connectors.hf.hybrid import hybrid_client

    client = hybrid_client(model, controller="127.0.0.1:7070", model_id="google/gemma-3-270m")
    result = kdn_generate(model, tokenizer, prompt, client)

The connector keeps transformers' plain ``DynamicCache`` (every layer full length, the sliding mask hiding old
keys). A hit's sliding layers are filled with the stored window and zeros before it: the mask gives those
positions weight 0, so the cache computes exactly what a cache holding the real old keys computes. Storage holds
only the full layers per chunk plus the sliding layers' last ``W`` tokens at chosen boundaries
(``docs/connectors/hf.md``, "Hybrid models").
"""

from __future__ import annotations

from connectors.hf.cache import layout_for
from kdn import KVLayout
from kdn.blend.models import SUPPORTED_MODEL_TYPES, text_config
from kdn.client.hybrid import HybridClient
from kdn.errors import InvalidRequest

__all__ = ["HYBRID_MODEL_TYPES", "check_layer_aware", "hybrid_layout_for", "hybrid_client", "HFHybridClient"]

#: Families whose plain ``DynamicCache`` holds per-layer K/V and whose layers are full or sliding attention.
HYBRID_MODEL_TYPES = SUPPORTED_MODEL_TYPES | {"gemma3_text"}
_KINDS = {"full_attention", "sliding_attention"}


def check_layer_aware(config) -> None:
    """Raise :class:`InvalidRequest` unless this model's prefix KV can be stored by layer type and reused exactly:
    a decoder-only :data:`HYBRID_MODEL_TYPES` model whose layers are ``full_attention`` or ``sliding_attention``
    (with a ``sliding_window``), causal (Gemma 3's bidirectional embedding variant is refused)."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", "") or getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        raise InvalidRequest(f"KDN HF connector: encoder-decoder models ({model_type}) are not supported")
    if model_type not in HYBRID_MODEL_TYPES:
        raise InvalidRequest(f"KDN HF connector (layer-type aware): model type {model_type!r} is not supported; "
                             f"supported: {', '.join(sorted(HYBRID_MODEL_TYPES))}")
    if getattr(cfg, "kv_lora_rank", None):
        raise InvalidRequest("KDN HF connector: multi-head latent attention (MLA) is not supported")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise InvalidRequest("KDN HF connector: bidirectional attention is not a causal prefix")
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if kinds - _KINDS:
        raise InvalidRequest(f"KDN HF connector: layer types {sorted(kinds - _KINDS)} are not supported")
    if "sliding_attention" in kinds and not getattr(cfg, "sliding_window", None):
        raise InvalidRequest("KDN HF connector: sliding_attention layers without a sliding_window")


def hybrid_layout_for(model, *, model_id: str | None = None, revision: str | None = None) -> KVLayout:
    """The KDN layout of ``model``'s KV with each layer's type and the window (checks support first).

    ``model_id`` defaults to ``config._name_or_path``; name the weights when that is a local folder path."""
    return layout_for(model, model_id=model_id, revision=revision, check=check_layer_aware)


class HFHybridClient(HybridClient):
    """A :class:`HybridClient` for transformers models: :meth:`check_model` is what the HF connector's
    ``prefill`` / ``kdn_generate`` run instead of their all-full-attention check."""

    def check_model(self, config) -> None:
        """Raise :class:`InvalidRequest` unless ``config``'s model is supported and has this layout's layer types
        and window (shapes and dtype are checked by the caller)."""
        check_layer_aware(config)
        want = KVLayout.from_hf_config(config, model_id="check")
        mine = self.layout.layer_types or ("full_attention",) * self.layout.num_layers
        theirs = want.layer_types or ("full_attention",) * want.num_layers
        if mine != theirs or want.sliding_window != self.layout.sliding_window:
            raise InvalidRequest(f"client layout's layer types / window (W={self.layout.sliding_window}) do not "
                                 f"match the model's (W={want.sliding_window})")


def hybrid_client(model, config=None, *, model_id: str | None = None, **overrides) -> HFHybridClient:
    """An :class:`HFHybridClient` for ``model`` (layout from :func:`hybrid_layout_for`); ``config`` and
    ``overrides`` as for ``KDNClient`` (``controller=...``, ``codec=...``, ``chunk_size=...``)."""
    return HFHybridClient(hybrid_layout_for(model, model_id=model_id), config, **overrides)
