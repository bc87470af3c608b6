"""``KDNHiCacheStorage``: KDN as an SGLang HiCache storage backend (L3), loaded the documented dynamic way::

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kdn",
            "module_path": "connectors.sglang.backend", "class_name": "KDNHiCacheStorage",
            "client": {"controller": "127.0.0.1:7070", "tenant": "acme", "codec": "lz4"}}'

SGLang constructs it as ``KDNHiCacheStorage(storage_config, kwargs)`` and then calls
``register_mem_pool_host(host_pool)``; the KDN client is created there, once the page geometry is known. Pages are
keyed by SGLang's page hashes (see :mod:`connectors.sglang.pages`). Supported: MHA host pools with layouts
``layer_first``, ``page_first``, ``page_first_direct``, ``page_head``; both the generic page interface
(``batch_get``/``batch_set``) and, with ``"interface_v1": 1``, the zero-copy ``batch_get_v1``/``batch_set_v1``.
"""

from __future__ import annotations

import logging
from typing import Any

import sglang
import torch
from packaging.version import Version
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from connectors.sglang import SUPPORTED_SGLANG
from connectors.sglang.pages import PAGE_ORDERS, PageStore, flat_to_kv, kv_to_flat, page_key
from kdn import KVLayout
from kdn.client import KDNClient
from kdn.config import ClientConfig, load_config
from kdn.errors import ConfigError

__all__ = ["KDNHiCacheStorage", "SGLANG_KEYS"]

log = logging.getLogger(__name__)

if not (Version(SUPPORTED_SGLANG[0]) <= Version(sglang.__version__) < Version(SUPPORTED_SGLANG[1])):
    raise ImportError(f"KDN's SGLang backend supports sglang >={SUPPORTED_SGLANG[0]},<{SUPPORTED_SGLANG[1]}; "
                      f"found {sglang.__version__}")

#: Keys of the extra config that belong to SGLang itself (its dynamic loader and page interface switch).
SGLANG_KEYS = {"backend_name", "module_path", "class_name", "interface_v1"}
_OWN_KEYS = {"kdn_config", "client", "model_id"}


def client_config(extra: dict | None) -> tuple[ClientConfig, str]:
    """KDN client settings and model id from SGLang's extra config (defaults < YAML < env < ``client``)."""
    extra = dict(extra or {})
    unknown = set(extra) - SGLANG_KEYS - _OWN_KEYS
    if unknown:
        raise ConfigError(f"hicache storage extra config: unknown key(s) {sorted(unknown)}; KDN reads "
                          f"{sorted(_OWN_KEYS)}")
    client = extra.get("client") or {}
    if not isinstance(client, dict):
        raise ConfigError("hicache storage extra config: 'client' must be a mapping of KDN client settings")
    config = load_config(extra.get("kdn_config"), overrides={f"client.{k}": v for k, v in client.items()})
    return config.client, str(extra.get("model_id") or "")


class KDNHiCacheStorage(HiCacheStorage):
    """SGLang pages in KDN. Thread-safe (SGLang calls it from its prefetch and backup threads)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        self.config, model_id = client_config(storage_config.extra_config)
        self.model_id = model_id or storage_config.model_name or "sglang-model"
        if storage_config.is_mla_model:
            raise NotImplementedError("KDNHiCacheStorage supports MHA/GQA models; MLA pages are not supported yet")
        self.client: KDNClient | None = None
        self.store: PageStore | None = None
        self.stats = {"get_pages": 0, "get_hits": 0, "set_pages": 0, "set_ok": 0, "exists_calls": 0}

    # -- set-up --------------------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        pool = mem_pool_host
        if getattr(pool, "layout", None) not in PAGE_ORDERS:
            raise NotImplementedError(f"KDNHiCacheStorage: host pool layout {getattr(pool, 'layout', None)!r} is "
                                      f"not supported; use one of {sorted(PAGE_ORDERS)}")
        for attr in ("layer_num", "head_num", "head_dim", "page_size", "dtype"):
            if not hasattr(pool, attr):
                raise NotImplementedError(f"KDNHiCacheStorage: host pool {type(pool).__name__} has no {attr} "
                                          "(only MHA pools are supported)")
        sc = self.storage_config
        model_id = self.model_id if sc.pp_size <= 1 else f"{self.model_id}@pp{sc.pp_rank}of{sc.pp_size}"
        layout = KVLayout(model_id, num_layers=pool.layer_num, num_kv_heads=pool.head_num, head_dim=pool.head_dim,
                          dtype=str(pool.dtype).removeprefix("torch."), tp_rank=sc.tp_rank, tp_size=sc.tp_size)
        if self.client is not None:
            self.client.close()
        self.client = KDNClient(layout, self.config)
        self.store = PageStore(self.client)
        self.page_shape = (pool.layer_num, pool.page_size, pool.head_num, pool.head_dim)
        log.info("KDN HiCache backend: %s, page %d tokens, layout %s, controller %s, tenant %s, codec %s", model_id,
                 pool.page_size, pool.layout, self.config.controller, self.config.tenant, self.config.codec)

    def _require(self) -> PageStore:
        if self.store is None:
            raise RuntimeError("KDNHiCacheStorage used before register_mem_pool_host()")
        return self.store

    def _keys(self, hashes: list[str]):
        client = self.client
        return [page_key(h, client.config.tenant, client.fingerprint, client.codec.name) for h in hashes]

    def _to_kv(self, page: torch.Tensor) -> torch.Tensor:
        L, P, H, D = self.page_shape  # noqa: N806
        return flat_to_kv(page, self.mem_pool_host.layout, L, P, H, D)

    # -- generic page interface ----------------------------------------------------------------------------------
    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None
            ) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
                  ) -> list[torch.Tensor | None]:
        """Pages into ``target_locations`` (flat pages; new tensors if ``None``); ``None`` per missing page."""
        store = self._require()
        pages = store.get(self._keys(list(keys)))
        out: list[torch.Tensor | None] = []
        for i, kv in enumerate(pages):
            if kv is None:
                out.append(None)
                continue
            target = target_locations[i] if target_locations is not None else None
            out.append(kv_to_flat(kv, self.mem_pool_host.layout, out=target))
        self.stats["get_pages"] += len(keys)
        self.stats["get_hits"] += sum(p is not None for p in out)
        return out

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> bool:
        """Store flat pages ``values`` under SGLang's page hashes ``keys``; True when all are stored."""
        return all(self._set_pages(list(keys), [self._to_kv(v) for v in values]))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many of ``keys``, from the first, are stored."""
        self.stats["exists_calls"] += 1
        return self._require().leading_hits(self._keys(list(keys)))

    def _set_pages(self, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
        ok = self._require().put(self._keys(keys), pages)
        self.stats["set_pages"] += len(keys)
        self.stats["set_ok"] += sum(ok)
        return ok

    # -- zero-copy page interface (extra config "interface_v1": 1) -----------------------------------------------
    def _page_index(self, host_indices: torch.Tensor, i: int) -> int:
        return int(host_indices[i * self.mem_pool_host.page_size])

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Pages straight into the registered host pool at ``host_indices`` (page-aligned token slots)."""
        pages = self._require().get(self._keys(list(keys)))
        pool = self.mem_pool_host
        ok = []
        for i, kv in enumerate(pages):
            if kv is not None:
                pool.set_from_flat_data_page(self._page_index(host_indices, i), kv_to_flat(kv, pool.layout))
            ok.append(kv is not None)
        self.stats["get_pages"] += len(keys)
        self.stats["get_hits"] += sum(ok)
        return ok

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Pages of the registered host pool at ``host_indices`` into KDN."""
        pool = self.mem_pool_host
        pages = [self._to_kv(pool.get_data_page(self._page_index(host_indices, i), flat=True))
                 for i in range(len(keys))]
        return self._set_pages(list(keys), pages)

    # -- housekeeping --------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """No-op: KDN objects are shared and evicted by KDN's own policy (``kdnctl keys evict`` removes them)."""
        log.info("KDNHiCacheStorage.clear(): KDN storage is shared; use kdnctl to evict keys")

    def get_stats(self) -> dict:
        return dict(self.stats)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.store = None
