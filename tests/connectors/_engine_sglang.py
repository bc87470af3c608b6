"""Checks of ``KDNHiCacheStorage`` against the installed SGLang's real storage classes (run in ``.venv-engines``).

Usage: ``python tests/connectors/_engine_sglang.py CONTROLLER_ADDRESS OUT.json``. Loads the backend through
SGLang's ``StorageBackendFactory`` ("dynamic"), keys pages with SGLang's own page hashes (``get_hash_str``) and
drives it the way ``HiCacheController`` does (``_generic_page_set``/``_generic_page_get``/``_storage_hit_query``
and the zero-copy ``interface_v1`` path). SGLang's ``MHATokenToKVPoolHost`` cannot be imported without
torchvision (absent on purpose: it breaks vLLM's CPU build in the same environment), so :class:`HostPool` below
reproduces its page methods for the four MHA layouts (``sglang/srt/mem_cache/pool_host/mha.py``).
"""

from __future__ import annotations

import json
import sys

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str

L, H, D, P = 4, 2, 16, 8  # layers, kv heads, head dim, page size


class HostPool:
    """The page methods of SGLang's ``MHATokenToKVPoolHost`` for one layout, over a random buffer."""

    def __init__(self, layout: str, pages: int = 8, seed: int = 0) -> None:
        self.layout, self.page_size, self.layer_num, self.head_num, self.head_dim = layout, P, L, H, D
        self.dtype, self.device, self.pin_memory, self.size = torch.bfloat16, "cpu", False, pages * P
        dims = {"layer_first": (2, L, self.size, H, D), "page_first": (2, self.size, L, H, D),
                "page_first_direct": (2, pages, L, P, H, D), "page_head": (2, pages, H, P, L, D)}[layout]
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn(dims, generator=g).to(self.dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index:index + P]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index:index + P]
        else:
            page = self.kv_buffer[:, index // P:index // P + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((2, L, P, H, D), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        shapes = {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                  "page_first_direct": (2, 1, L, P, H, D), "page_head": (2, 1, H, P, L, D)}
        self.get_data_page(index, flat=False)[...] = data_page.reshape(shapes[self.layout])

    def kv_of_page(self, index: int) -> torch.Tensor:
        """The page as ``[L, 2, P, H, D]`` (independent of layout), for comparisons."""
        page = self.get_data_page(index, flat=False)
        if self.layout == "layer_first":
            return page.permute(1, 0, 2, 3, 4)
        if self.layout == "page_first":
            return page.permute(2, 0, 1, 3, 4)
        if self.layout == "page_first_direct":
            return page[:, 0].permute(1, 0, 2, 3, 4)
        return page[:, 0].permute(3, 0, 2, 1, 4)


def backend(controller: str, pool: HostPool, *, tenant: str = "sg", model: str = "kdn-test/sglang",
            v1: bool = False, timeout: float = 10.0):
    extra = {"backend_name": "kdn", "module_path": "connectors.sglang.backend", "class_name": "KDNHiCacheStorage",
             "client": {"controller": controller, "tenant": tenant, "timeout_s": timeout}}
    if v1:
        extra["interface_v1"] = 1
    config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                  is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                                  model_name=model, extra_config=extra)
    store = StorageBackendFactory.create_backend("dynamic", config, pool)
    store.register_mem_pool_host(pool)  # what HiCacheController.attach_storage_backend does next
    return store


def generic_set(store, pool: HostPool, hashes: list[str], host_indices: torch.Tensor) -> bool:
    """``HiCacheController._generic_page_set``."""
    data = [pool.get_data_page(int(host_indices[i * P])) for i in range(len(hashes))]
    return store.batch_set(hashes, data)


def generic_get(store, pool: HostPool, hashes: list[str], host_indices: torch.Tensor) -> int:
    """``HiCacheController._generic_page_get``: pages into dummy buffers, then into the pool; returns the count."""
    page_data = store.batch_get(hashes, [pool.get_dummy_flat_data_page() for _ in hashes])
    count = 0
    for i in range(len(hashes)):
        if page_data[i] is None:
            break
        pool.set_from_flat_data_page(int(host_indices[i * P]), page_data[i])
        count += 1
    return count


def main(controller: str) -> dict:
    report: dict = {}
    tokens = list(range(1000, 1000 + 5 * P))
    hashes = get_hash_str(tokens, None, page_size=P)  # SGLang's own chained page hashes
    assert len(hashes) == 5 and len(set(hashes)) == 5
    idx = torch.arange(0, 5 * P)

    src = HostPool("page_first", seed=1)
    writer = backend(controller, src)
    report["is_hicache_storage"] = isinstance(writer, HiCacheStorage)
    report["exists_before"] = writer.batch_exists(hashes)
    report["set_ok"] = generic_set(writer, src, hashes[:3], idx)
    report["exists_after"] = writer.batch_exists(hashes)  # longest stored prefix of pages
    report["exists_single"] = [writer.exists(h) for h in hashes]
    report["set_again_ok"] = writer.set(hashes[0], src.get_data_page(0))  # already stored: a no-op success

    # Read back into every host layout: objects are layout-independent (KDN's [L, 2, P, H, D] convention).
    report["round_trip"] = {}
    for layout in ("layer_first", "page_first", "page_first_direct", "page_head"):
        dst = HostPool(layout, seed=2)
        reader = backend(controller, dst)
        got = generic_get(reader, dst, hashes, idx)
        same = all(torch.equal(dst.kv_of_page(i * P), src.kv_of_page(i * P)) for i in range(got))
        report["round_trip"][layout] = {"pages": got, "identical": same}
        reader.close()

    # Zero-copy interface ("interface_v1": 1): host indices straight into the registered pool.
    v1_src, v1_dst = HostPool("layer_first", seed=3), HostPool("page_head", seed=4)
    v1_hashes = get_hash_str(list(range(7, 7 + 3 * P)), None, page_size=P)
    v1w, v1r = backend(controller, v1_src, v1=True), backend(controller, v1_dst, v1=True)
    report["v1_set"] = v1w.batch_set_v1(v1_hashes, torch.arange(2 * P, 5 * P))
    report["v1_get"] = v1r.batch_get_v1(v1_hashes + ["0" * 64], torch.arange(0, 4 * P))
    report["v1_identical"] = all(torch.equal(v1_dst.kv_of_page(i * P), v1_src.kv_of_page((i + 2) * P))
                                 for i in range(3))

    # Scoping: another tenant or another model sees nothing.
    report["other_tenant_exists"] = backend(controller, HostPool("page_first"), tenant="other").batch_exists(hashes)
    report["other_model_exists"] = backend(controller, HostPool("page_first"), model="other/model").batch_exists(hashes)

    # KDN down: misses and failed writes, never exceptions into SGLang's threads.
    down = backend("127.0.0.1:9", HostPool("page_first"), timeout=1.0)
    report["down"] = {"exists": down.batch_exists(hashes), "get": down.batch_get(hashes[:2]),
                      "set": down.batch_set(hashes[:1], [src.get_data_page(0)])}
    report["stats"] = writer.get_stats()
    for s in (writer, v1w, v1r, down):
        s.close()
    return report


if __name__ == "__main__":
    result = main(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, default=str)
