"""Model shapes and the price catalog."""

from __future__ import annotations

import pytest

from costmodel import MODELS, Catalog, get_model, load_catalog
from costmodel.errors import CatalogError, InvalidInput
from costmodel.shapes import ModelShape


@pytest.mark.parametrize(("name", "kib_per_token"), [
    ("llama-2-7b", 512), ("llama-3-8b", 128), ("llama-3-70b", 320), ("mistral-7b", 128), ("qwen2.5-7b", 56),
    ("smollm2-135m", 22.5),
])
def test_kv_bytes_per_token(name: str, kib_per_token: float) -> None:
    shape = get_model(name)
    assert shape.kv_bytes_per_token == shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * 2
    assert shape.kv_bytes_per_token / 1024 == kib_per_token


def test_model_lookup() -> None:
    assert get_model("Llama-7B") is MODELS["llama-2-7b"]
    assert ModelShape("x", 32, 8, 128, dtype="fp8").kv_bytes_per_token == 65536
    with pytest.raises(InvalidInput, match="unknown model 'gpt-9'.*llama-3-8b"):
        get_model("gpt-9")
    with pytest.raises(InvalidInput, match="num_layers"):
        ModelShape("x", -1, 8, 128)
    with pytest.raises(InvalidInput, match="dtype"):
        ModelShape("x", 1, 8, 128, dtype="float13")


def test_default_catalog_has_sources(catalog: Catalog) -> None:
    assert {"v100", "h100"} <= set(catalog.gpus)
    for gpu in catalog.gpus.values():
        assert gpu.price_per_hour > 0 and gpu.source and gpu.as_of
    offers = catalog.tier_offers(catalog.gpu("h100"), names=list(catalog.tiers))
    assert {o.name for o in offers} >= {"gpu", "cpu", "disk", "redis", "s3"}
    for offer in offers:
        assert offer.per_gb_hour > 0 and offer.source and offer.as_of
    for net in catalog.networks.values():
        assert net.source and net.as_of
    gpu_tier = catalog.tier_offers(catalog.gpu("h100"), names=["gpu"])[0]
    assert gpu_tier.per_gb_hour == pytest.approx(catalog.gpu("h100").price_per_hour / 80)
    s3 = catalog.tier_offers(catalog.gpu(), names=["s3"])[0]
    assert s3.per_gb_hour == pytest.approx(0.023 / 730) and s3.get_fee == 4e-7


def test_network_fees_apply_to_remote_tiers_only(catalog: Catalog) -> None:
    net = catalog.network("dedicated-10g")
    offers = {o.name: o for o in catalog.tier_offers(catalog.gpu(), net)}
    assert offers["redis"].egress_per_gb == 0.02 and offers["redis"].link_per_hour == 2.25
    assert offers["cpu"].egress_per_gb == 0 and offers["cpu"].link_per_hour == 0


def test_user_yaml_and_overrides_merge(tmp_path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text("gpus: {h100: {price_per_hour: 2.49}}\n"
                    "tiers: {nvme: {kind: disk, per_gb_month: 0.05, bandwidth_gbps: 6}}\n")
    cat = load_catalog(user, ["tiers.s3.bandwidth_gbps=2", "defaults.gpu=v100"])
    assert cat.gpu("h100").price_per_hour == 2.49
    assert cat.gpu("h100").peak_tflops == 989  # untouched fields kept
    assert cat.gpu().name == "v100"
    nvme, s3 = cat.tier_offers(cat.gpu(), names=["nvme", "s3"])
    assert nvme.per_gb_hour == pytest.approx(0.05 / 730) and s3.bandwidth_gbps == 2


@pytest.mark.parametrize(("yaml_text", "override", "match"), [
    ("gpus: {h100: {price_per_hour: -1}}", None, "price_per_hour"),
    ("gpus: {h100: {colour: red}}", None, "colour"),
    ("tiers: {x: {bandwidth_gbps: 1}}", None, "missing price"),
    ("tiers: {x: {per_gb_hour: 1, bandwidth_gbps: 1, speed: 3}}", None, "unknown field"),
    ("", "nonsense", "bad override"),
    ("[1, 2]", None, "mapping"),
])
def test_bad_catalog(tmp_path, yaml_text: str, override: str | None, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises((CatalogError, InvalidInput), match=match):
        cat = load_catalog(path, [override] if override else None)
        cat.tier_offers(cat.gpu(), names=list(cat.tiers))


def test_unknown_names(catalog: Catalog) -> None:
    with pytest.raises(InvalidInput, match="unknown GPU 'tpu'"):
        catalog.gpu("tpu")
    with pytest.raises(InvalidInput, match="unknown tier"):
        catalog.tier_offers(catalog.gpu(), names=["tape"])
    with pytest.raises(InvalidInput, match="unknown network"):
        catalog.network("carrier-pigeon")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog("/nonexistent/prices.yaml")
