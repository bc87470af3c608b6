"""KDN for SGLang: a HiCache storage backend (see ``docs/connectors/sglang.md``).

``connectors.sglang.backend.KDNHiCacheStorage`` is the class SGLang loads with ``--hicache-storage-backend
dynamic`` (it imports SGLang); :mod:`connectors.sglang.pages` (page formats, keys, keyed object I/O) is plain
Python over ``kdn.client`` and torch, importable without SGLang.
"""

#: SGLang versions the backend is written against: ``[min, max)``.
SUPPORTED_SGLANG = ("0.5.23", "0.6.0")

__all__ = ["SUPPORTED_SGLANG"]
