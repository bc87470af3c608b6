"""Storage tiers, registered by kind and imported lazily (``import kdn`` never imports redis or boto3).

Each tier class names its configuration dataclass in ``config_class`` and builds itself with
``from_config(config, data_dir)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdn.errors import ConfigError

if TYPE_CHECKING:
    from kdn.node.tiers.base import Tier

__all__ = ["tier_class", "available_tiers", "register_tier", "build_tier"]

_REGISTRY: dict[str, str] = {
    "memory": "kdn.node.tiers.memory:MemoryTier",
    "pinned": "kdn.node.tiers.pinned:PinnedTier",
    "gpu": "kdn.node.tiers.gpu:GPUTier",
    "disk": "kdn.node.tiers.disk:DiskTier",
    "redis": "kdn.node.tiers.redis:RedisTier",
    "s3": "kdn.node.tiers.s3:S3Tier",
}


def register_tier(kind: str, target: str) -> None:
    """Register ``"module:Class"`` for tier ``kind``."""
    _REGISTRY[kind] = target


def available_tiers() -> list[str]:
    return sorted(_REGISTRY)


def tier_class(kind: str) -> type[Tier]:
    try:
        target = _REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"unknown tier kind {kind!r}; available: {', '.join(available_tiers())}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_tier(kind: str, config: Any, data_dir: str) -> Tier:
    """Instantiate the tier ``kind`` from its (already validated) config dataclass."""
    return tier_class(kind).from_config(config, data_dir)
