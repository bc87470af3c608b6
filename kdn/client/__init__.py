"""The client side of KDN: what an engine (through its connector) links against.

- :class:`KDNClient` (``kdn_client``): lookup, verified retrieval (whole prefix or layer by layer), async store.
- ``transport``: one storage node over gRPC, the bulk channel or same-host shared memory.
- ``control``: the control-plane calls (controller RPCs) shared by the client and ``kdnctl``.
- ``same_host``: zero-copy readers of a same-host node's shared memory (:func:`fast_source`).
- ``host_cache``: :class:`HostKVCache`, an in-process pinned KV cache (no node at all).
- ``profiles``: fetch-and-cache of codec profiles from the controller.

Names are imported lazily so ``import kdn.client`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["KDNClient", "LookupResult", "ChunkHit", "RetrieveResult", "StoreResult", "LayerStream", "ControlClient",
           "HostKVCache", "HostStoreResult", "SharedRawSource", "fast_source"]

_LAZY = {
    **dict.fromkeys(["KDNClient", "LookupResult", "ChunkHit", "RetrieveResult", "StoreResult", "LayerStream"],
                    "kdn.client.kdn_client"),
    "ControlClient": "kdn.client.control",
    "HostKVCache": "kdn.client.host_cache",
    "HostStoreResult": "kdn.client.host_cache",
    "SharedRawSource": "kdn.client.same_host",
    "fast_source": "kdn.client.same_host",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdn.client' has no attribute {name!r}")
