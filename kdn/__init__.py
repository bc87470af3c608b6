"""KDN: a KV-cache delivery network.

The public entry points are imported lazily so that ``import kdn`` stays light (no torch, grpc, redis or boto3):

- :class:`kdn.client.KDNClient` - lookup, store and retrieve KV caches.
- :class:`kdn.layout.KVLayout` - the model layout whose fingerprint scopes every key.
- :func:`kdn.config.load_config` - the one typed configuration.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["KDNClient", "KVLayout", "load_config", "__version__"]

_LAZY = {"KDNClient": "kdn.client", "KVLayout": "kdn.layout", "load_config": "kdn.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdn' has no attribute {name!r}")
