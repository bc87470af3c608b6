"""KV codecs, registered by name and imported lazily.

``get_codec(name, layout, **options)`` returns a codec instance; ``available_codecs()`` lists the registered names.
The ``cachegen-*`` levels take ``profile=ModelProfile | path`` (see :mod:`codec.profile`); without one they can
be built but refuse to encode or decode with an :class:`InvalidInput` that says how to make a profile.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from codec.errors import InvalidInput

if TYPE_CHECKING:
    from codec.base import Codec, ShapeLike

__all__ = ["get_codec", "available_codecs", "register_codec"]

_REGISTRY: dict[str, str] = {
    "raw": "codec.raw:RawCodec",
    "lz4": "codec.lz4:LZ4Codec",
    "lossless": "codec.lossless:LosslessCodec",
    "cachegen-high": "codec.cachegen:CacheGenHigh",
    "cachegen-default": "codec.cachegen:CacheGenDefault",
    "cachegen-compact": "codec.cachegen:CacheGenCompact",
}


def register_codec(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (the class is imported on first use)."""
    _REGISTRY[name] = target


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown codec {name!r}; available: {', '.join(available_codecs())}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_codec(name: str, layout: ShapeLike, **options) -> Codec:
    return codec_class(name)(layout, **options)
