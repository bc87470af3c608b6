"""KDN: a KV-cache delivery network.

The public entry points are imported lazily so that ``import kdn`` stays light (no torch, grpc, redis or boto3):

- :class:`kdn.client.KDNClient` - lookup, store and retrieve KV caches.
- :class:`kdn.format.layout.KVLayout` - the model layout whose fingerprint scopes every key.
- :func:`kdn.config.load_config` - the one typed configuration.
- the key helpers (:class:`ChunkKey`, :func:`prefix_keys`, :func:`content_key`, ...) and every error class of
  :mod:`kdn.errors`.

Connectors use these names, :mod:`kdn.client` and :mod:`kdn.blend` only (``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_KEYS = ["ChunkKey", "ChunkSpan", "KeyKind", "DIGEST_BYTES", "prefix_keys", "content_key", "chunk_spans"]
_ERRORS = ["KDNError", "PermanentError", "RetryableError", "ConfigError", "InvalidRequest", "AuthError", "NotFound",
           "CorruptObject", "Unavailable", "DeadlineExceeded", "CapacityError"]
_LAZY = {
    "KDNClient": "kdn.client",
    "KVLayout": "kdn.format.layout",
    "load_config": "kdn.config",
    "ClientConfig": "kdn.config",
    "KDNConfig": "kdn.config",
    **dict.fromkeys(_KEYS, "kdn.format.keys"),
    **dict.fromkeys(_ERRORS, "kdn.errors"),
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdn' has no attribute {name!r}")
