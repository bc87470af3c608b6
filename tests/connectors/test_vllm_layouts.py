"""vLLM's GPU paged-KV layouts, as vLLM itself declares and allocates them, round-tripped block <-> chunk.

``data/vllm_layouts.json`` is what :mod:`connectors.vllm.layouts` records from vLLM 0.32 (every GPU backend's
``supported_kv_cache_layouts``, and vLLM's own ``allocate_kv_cache`` views for each layout, block size and model
shape, hybrid groups included); :func:`test_fixture_is_what_vllm_declares` regenerates it from the installed
vLLM (``.venv-engines``) and fails if it changed. The other tests rebuild those exact strided views over one
backing buffer (CPU, and CUDA where present — ``scripts/gpu_vllm_layouts.sh``) and check that
:class:`~connectors.vllm.paged.StridedKVLayout` reads what the backends read (their split of the logical view)
and writes exactly the bytes of the blocks it is given: the whole buffer, every other layer, block and aliasing
group included, must equal an independent element-wise write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from connectors.vllm.paged import StridedKVLayout
from kdn.errors import InvalidRequest
from tests.connectors._engine_models import engines_missing, run_engine_python

FIXTURE = Path(__file__).parent / "data" / "vllm_layouts.json"
DATA = json.loads(FIXTURE.read_text())
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def views(alloc: dict, device: str, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The backing buffer (random bytes) and every layer's logical view, with vLLM's strides and offsets."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-128, 128, (alloc["buffer_bytes"],), dtype=torch.int8, generator=gen).to(device)
    flat = raw.view(torch.bfloat16)
    out = {name: torch.as_strided(flat, v["shape"], v["stride"], v["offset"]) for name, v in alloc["views"].items()}
    return raw, out


def reference_kv(view: torch.Tensor, block_ids: list[int], head_dim: int) -> torch.Tensor:
    """What FlashAttention reads: ``kv_cache.transpose(1, 2).split(head_size, -1)``, blocks in order."""
    key, value = view.transpose(1, 2).split(head_dim, dim=-1)  # [B, N, H, D] each
    ids = torch.tensor(block_ids, device=view.device)
    return torch.stack([key[ids].flatten(0, 1), value[ids].flatten(0, 1)])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (random bytes include NaNs, which ``torch.equal`` never calls equal)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def test_backends_declare_the_layouts_we_map():
    backends = DATA["backends"]
    assert DATA["vllm"].startswith("0.32.")
    assert {"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"} <= set(backends)
    assert backends["FLEX_ATTENTION"]["sm90"] == ["LBNHC"]
    assert backends["FLASHINFER"]["sm100"] == ["LBHNC", "BLHNC"]  # trtllm-gen: head-major block interiors
    mapped = {key.split("/")[0] for key in DATA["allocations"]}
    assert mapped == {name for per_sm in backends.values() for names in per_sm.values() for name in names}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", sorted(DATA["allocations"]))
def test_round_trip_is_byte_exact(key, device):
    alloc = DATA["allocations"][key]
    bs, heads, dim = int(key.split("/")[1]), alloc["num_kv_heads"], alloc["head_dim"]
    paged = StridedKVLayout(bs, heads, dim)
    raw, caches = views(alloc, device)
    for cache in caches.values():
        paged.check(cache)
    # Gather reads what the backend reads.
    for name, cache in caches.items():
        ids = [3, 0, alloc["num_blocks"] - 1]
        assert same(paged.gather(cache, ids), reference_kv(cache, ids, dim)), name
    # Scatter writes exactly those blocks of that layer: compare the whole buffer with an element-wise write.
    expected_raw, expected = views(alloc, device)
    gen = torch.Generator().manual_seed(1)
    for i, (name, cache) in enumerate(caches.items()):
        ids = [(5 * i + 1) % alloc["num_blocks"], (5 * i + 3) % alloc["num_blocks"]]
        kv = torch.randn(2, 2 * bs, heads, dim, generator=gen).to(torch.bfloat16)
        paged.scatter(cache, ids, kv)  # CPU source into a `device` cache
        ref = expected[name]
        for j, b in enumerate(ids):
            for t in range(bs):
                ref[b, :, t, :dim] = kv[0, j * bs + t].to(device)
                ref[b, :, t, dim:] = kv[1, j * bs + t].to(device)
        assert same(paged.gather(cache, ids), kv.to(device)), name
    assert torch.equal(raw, expected_raw), "a scatter touched bytes outside its blocks"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLHNC"])
def test_tensor_parallel_ranks_split_heads(layout, device):
    """Each TP rank's cache holds its heads; scattering the rank slices and gathering them back restores the
    model's KV (each rank stores under its own layout fingerprint)."""
    alloc = DATA["allocations"][f"{layout}/16/llama-like-tp2"]
    full_heads, dim = 2 * alloc["num_kv_heads"], alloc["head_dim"]
    kv = torch.randn(2, 48, full_heads, dim).to(torch.bfloat16)
    paged = StridedKVLayout(16, alloc["num_kv_heads"], dim)
    parts = []
    for rank in range(2):
        _, caches = views(alloc, device, seed=rank)
        cache = next(iter(caches.values()))
        share = kv[:, :, rank * paged.num_kv_heads:(rank + 1) * paged.num_kv_heads]
        paged.scatter(cache, [7, 2, 5], share)
        parts.append(paged.gather(cache, [7, 2, 5]))
    assert same(torch.cat(parts, dim=2).cpu(), kv)


def test_bad_input_is_a_clear_error():
    alloc = DATA["allocations"]["LBNHC/16/llama-like"]
    _, caches = views(alloc, "cpu")
    cache = next(iter(caches.values()))
    paged = StridedKVLayout(16, alloc["num_kv_heads"], alloc["head_dim"])
    with pytest.raises(InvalidRequest, match="block ids outside"):
        paged.gather(cache, [alloc["num_blocks"]])
    with pytest.raises(InvalidRequest, match="does not fill"):
        paged.scatter(cache, [1], torch.zeros(2, 15, alloc["num_kv_heads"], alloc["head_dim"]))
    with pytest.raises(InvalidRequest, match="logical per-layer view"):
        StridedKVLayout(32, alloc["num_kv_heads"], alloc["head_dim"]).check(cache)


def test_fixture_is_what_vllm_declares(tmp_path):
    reason = engines_missing("vllm")
    if reason:
        pytest.skip(reason)
    out, log = tmp_path / "layouts.json", tmp_path / "layouts.log"
    rc = run_engine_python(["-m", "connectors.vllm.layouts", str(out)], timeout=300, log=log)
    assert rc == 0, log.read_text()[-3000:]
    assert json.loads(out.read_text()) == DATA
