"""``KDNHiCacheStorage`` against the installed SGLang's real storage interface (in ``.venv-engines``, as a
subprocess), with a real KDN cluster; plus the page-format conversions in the main venv.

Not covered here (see docs/connectors/sglang.md): a running SGLang engine and SGLang's own host pool class,
neither of which can be imported on these CPU machines (SGLang's config package needs torchvision, which breaks
vLLM's CPU build in the same environment).
"""

from __future__ import annotations

import json

import pytest
import torch

from connectors.sglang.pages import PAGE_ORDERS, flat_to_kv, kv_to_flat, page_key
from tests.connectors._engine_models import engines_missing, run_engine_python


@pytest.mark.parametrize("layout", sorted(PAGE_ORDERS))
def test_flat_pages_round_trip(layout):
    L, P, H, D = 3, 4, 2, 8  # noqa: N806
    kv = torch.randn(L, 2, P, H, D).to(torch.bfloat16)
    flat = kv_to_flat(kv, layout)
    assert flat.shape == (L * 2 * P * H * D,)
    assert torch.equal(flat_to_kv(flat, layout, L, P, H, D), kv)
    if layout == "layer_first":  # [2, L, P, H, D]
        assert torch.equal(flat.view(2, L, P, H, D)[1, 2], kv[2, 1])


def test_page_keys_are_scoped():
    fp = bytes(16)
    key = page_key("ab" * 32, "acme", fp, "raw")
    assert str(key).startswith("acme/") and str(key) != str(page_key("ab" * 32, "other", fp, "raw"))
    assert str(key) != str(page_key("ab" * 32, "acme", b"\1" * 16, "raw"))


@pytest.mark.slow
def test_backend_against_real_sglang_classes(cluster, tmp_path):
    reason = engines_missing("sglang")
    if reason:
        pytest.skip(reason)
    out, log = tmp_path / "out.json", tmp_path / "sglang.log"
    rc = run_engine_python(["tests/connectors/_engine_sglang.py", cluster.address, str(out)], timeout=240, log=log)
    assert rc == 0, log.read_text()[-4000:]
    r = json.loads(out.read_text())
    assert r["is_hicache_storage"]
    assert (r["exists_before"], r["set_ok"], r["exists_after"], r["set_again_ok"]) == (0, True, 3, True)
    assert r["exists_single"] == [True, True, True, False, False]
    assert r["round_trip"] == {layout: {"pages": 3, "identical": True} for layout in PAGE_ORDERS}
    assert r["v1_set"] == [True] * 3 and r["v1_get"] == [True, True, True, False] and r["v1_identical"]
    assert (r["other_tenant_exists"], r["other_model_exists"]) == (0, 0)
    assert r["down"] == {"exists": 0, "get": [None, None], "set": False}
