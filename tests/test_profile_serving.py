"""Codec model profiles end to end: ``kdnctl codec profile`` builds one from the real SmolLM2 and uploads it; the
controller (a real process, tokens on) stores it durably; a client with ``cachegen-default`` and no local profile
fetches it, caches it, verifies it, and round-trips real KV through a storage node.

About 40 s on 2 cores: a tiny profile (one text, 256 tokens, no Fisher, no calibration).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from kdn import KDNClient
from kdn.errors import AuthError, InvalidRequest, Unavailable
from kdn.format.layout import KVLayout
from tests.cluster import Cluster
from tests.models import CACHE_DIR, MODEL_ID, load_smollm2, sotu_texts

TOKENS = {"admin-secret": "@admin", "node-secret": "@node", "acme-secret": "acme"}
CHUNK = 256


@pytest.fixture(scope="module")
def model():
    try:
        lm, tok = load_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if not sotu_texts():
        pytest.skip("sotu is not installed")
    return lm, tok


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yaml_tokens = "{" + ", ".join(f"{k}: '{v}'" for k, v in TOKENS.items()) + "}"
    c = Cluster(tmp_path_factory.mktemp("cluster"), common=["--set", f"auth.tokens={yaml_tokens}"],
                admin_token="admin-secret")
    c.start_controller()
    c.start_node("node-a", extra=["--set", "node.token=node-secret"])
    c.wait_nodes(1)
    yield c
    c.close()


@pytest.fixture(scope="module")
def uploaded(model, cluster, tmp_path_factory):
    """``(path, kdnctl's JSON report)`` of a tiny profile built and uploaded by ``kdnctl codec profile``."""
    import contextlib
    import io
    import json

    from kdn.cli.ctl import main

    out = tmp_path_factory.mktemp("profile") / "smollm2.kdnp"
    folder = CACHE_DIR / "smollm2-135m-instruct-q4_1-float32"  # written by load_smollm2
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--controller", cluster.address, "--token", "admin-secret", "--json", "codec", "profile",
                   "--model", str(folder), "--model-id", MODEL_ID, "--texts", str(sotu_texts()[10]),
                   "--context", "256", "--fisher-samples", "0", "--out", str(out), "--upload"])
    assert rc == 0
    return out, json.loads(stdout.getvalue())


def _prompt_kv(model, text: str, tokens: int) -> tuple[list[int], torch.Tensor]:
    from codec._hf import prefill_kv

    lm, tok = model
    ids = tok(text, return_tensors="pt").input_ids[0][:tokens]
    return ids.tolist(), prefill_kv(lm, ids).to(torch.bfloat16)


def _client(layout: KVLayout, c: Cluster, cache, **kw) -> KDNClient:
    options = dict(controller=c.address, token="acme-secret", tenant="acme", chunk_size=CHUNK,
                   codec="cachegen-default", profile_cache=str(cache))
    return KDNClient(layout, **{**options, **kw})


def _upload_args(c: Cluster, token: str) -> argparse.Namespace:
    from kdn.cli.ctl import build_parser

    return build_parser().parse_args(["--controller", c.address, "--token", token, "status"])


@pytest.mark.slow
def test_cli_builds_and_uploads(model, uploaded):
    from codec._profile_format import ModelProfile

    path, report = uploaded
    profile = ModelProfile.load(path)
    assert report["uploaded"] == report["profile_id"] == profile.profile_id().hex()
    assert set(profile.levels) == {"high", "default", "compact"} and profile.model_id == MODEL_ID
    assert report["fingerprints"]["bfloat16"] == KVLayout.from_hf_config(model[0].config).fingerprint().hex()


@pytest.mark.slow
def test_client_fetches_caches_and_round_trips(model, cluster, uploaded, tmp_path):
    from codec._profile_format import ModelProfile, profile_id

    pid = ModelProfile.load(uploaded[0]).profile_id()
    layout = KVLayout.from_hf_config(model[0].config)
    cache = tmp_path / "cache"
    prompt, kv = _prompt_kv(model, sotu_texts()[20].read_text(), 2 * CHUNK)
    with _client(layout, cluster, cache, layer_group=6) as client:
        assert client.codec.meta().endswith(pid)
        assert client.store(prompt, kv).result(60).stored == 2
        hit = client.retrieve(prompt)
    assert hit.num_tokens == 2 * CHUNK
    err = ((hit.kv.float() - kv.float()).norm() / kv.float().norm()).item()
    assert 0 < err < 0.3
    cached = list(cache.glob("*.kdnp"))
    assert [p.name for p in cached] == [f"{layout.fingerprint().hex()}-{pid.hex()}.kdnp"]
    assert profile_id(cached[0].read_bytes()) == pid

    # A tampered cache file is not trusted: the client fetches the profile again.
    cached[0].write_bytes(b"KDNP" + bytes(64))
    with _client(layout, cluster, cache) as client:
        assert client.codec.meta().endswith(pid)
    assert profile_id(cached[0].read_bytes()) == pid


@pytest.mark.slow
def test_foreign_profiles_and_uploads_are_refused(model, cluster, uploaded, tmp_path):
    from codec._profile_format import ModelProfile
    from kdn.cli.codec import upload

    ours = ModelProfile.load(uploaded[0])
    other = ModelProfile.load(uploaded[0])
    other.info = dict(other.info, note="another build")  # same tables, another profile id
    other_path = tmp_path / "other.kdnp"
    other.save(other_path)
    layout = KVLayout.from_hf_config(model[0].config)
    tiny = KVLayout("kdn-test/tiny-llama", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16")

    # Uploads need the admin token, and a valid profile.
    with pytest.raises(AuthError):
        upload(_upload_args(cluster, "acme-secret"), other.to_bytes(), [layout.fingerprint()])
    with pytest.raises(InvalidRequest):
        upload(_upload_args(cluster, "admin-secret"), b"KDNP not a profile", [layout.fingerprint()])

    # A profile registered for a layout of another shape is refused by the client.
    upload(_upload_args(cluster, "admin-secret"), ours.to_bytes(), [tiny.fingerprint()])
    with pytest.raises(InvalidRequest, match="layout has 4"):
        _client(tiny, cluster, tmp_path / "cache")

    # Chunks encoded with the controller's profile are misses for a client holding another profile.
    prompt, kv = _prompt_kv(model, sotu_texts()[30].read_text(), CHUNK)
    with _client(layout, cluster, tmp_path / "cache") as client:
        assert client.store(prompt, kv).result(60).stored == 1
        assert client.retrieve(prompt).num_tokens == CHUNK
    with _client(layout, cluster, tmp_path / "cache", codec_profile=str(other_path)) as foreign:
        assert foreign.lookup(prompt).hit_tokens == CHUNK  # the index has it ...
        assert foreign.retrieve(prompt).num_tokens == 0  # ... but it was encoded with another profile


@pytest.mark.slow
def test_profiles_survive_a_controller_restart(model, cluster, uploaded, tmp_path):
    from codec._profile_format import ModelProfile

    pid = ModelProfile.load(uploaded[0]).profile_id()
    layout = KVLayout.from_hf_config(model[0].config)
    with _client(layout, cluster, tmp_path / "cache"):
        pass
    cluster.controller.stop()
    with _client(layout, cluster, tmp_path / "cache", timeout_s=2) as client:  # the cache serves
        assert client.codec.meta().endswith(pid)
    with pytest.raises(Unavailable):
        _client(layout, cluster, tmp_path / "empty", timeout_s=2)
    cluster.start_controller(port=int(cluster.address.rsplit(":", 1)[1]))
    with _client(layout, cluster, tmp_path / "fresh") as client:  # kept in the controller's data dir
        assert client.codec.meta().endswith(pid)


def test_profile_store_persists_and_validates(tmp_path):
    """No model needed: a profile of random KV, stored, reloaded from disk, looked up by id and fingerprint."""
    from codec.profile import build_profile
    from kdn.controller.profile_store import ProfileStore

    gen = torch.Generator().manual_seed(0)
    profile = build_profile([torch.randn(2, 2, 64, 2, 16, generator=gen)], model_id="tiny")
    data, pid, fp = profile.to_bytes(), profile.profile_id(), bytes(range(16))
    store = ProfileStore(tmp_path / "profiles")
    assert store.put(data, [fp]) == pid
    with pytest.raises(InvalidRequest):
        store.put(data[:-1], [fp])
    with pytest.raises(InvalidRequest):
        store.put(data, [b"short"])
    again = ProfileStore(tmp_path / "profiles")
    assert again.get(fingerprint=fp) == (pid, data) == again.get(pid)
    assert again.get(fingerprint=bytes(16)) is None and ProfileStore(None).get(pid) is None
    (tmp_path / "profiles" / f"{pid.hex()}.kdnp").write_bytes(data[:-1] + b"x")  # damaged on disk: ignored
    assert ProfileStore(tmp_path / "profiles").get(fingerprint=fp) is None
