"""Layer-type-aware layouts and the hybrid client without a model: fingerprints of all-full layouts do not change,
hybrid layouts record each layer's type and the window, and a hybrid client over an all-full layout reads and
writes the same objects as a plain client (real controller and node)."""

from __future__ import annotations

import pytest
import torch

from kdn.client import KDNClient
from kdn.client.hybrid import HybridClient, window_key
from kdn.errors import InvalidRequest
from kdn.format.keys import KeyKind, prefix_keys
from kdn.format.layout import KVLayout
from tests.cluster import Cluster

GEMMA_TYPES = tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18))


def gemma_like(window: int = 512, types: tuple[str, ...] = GEMMA_TYPES) -> KVLayout:
    return KVLayout("gemma", len(types), 1, 256, dtype="bfloat16", layer_types=types, sliding_window=window)


def test_all_full_fingerprints_are_unchanged():
    """Values computed before ``sliding_window`` and ``part`` existed: stored objects keep their keys."""
    assert KVLayout("m", 30, 3, 64).fingerprint().hex() == "72e13aa4c8a9dfb04f6bb0231349b2b6"
    typed = KVLayout("m", 2, 8, 128, layer_types=("full_attention",) * 2)
    assert typed.fingerprint().hex() == "fad5d8650ca53208cb2aad8d50637137"
    assert KVLayout.from_dict(typed.to_dict()).fingerprint() == typed.fingerprint()
    assert typed.part_layout("full") is typed and not typed.is_hybrid


def test_hybrid_layout_records_types_and_window():
    base = gemma_like()
    assert base.is_hybrid and base.layers_of("full") == (5, 11, 17) and len(base.layers_of("sliding")) == 15
    assert gemma_like(1024).fingerprint() != base.fingerprint()  # the window is part of the identity
    moved = tuple(reversed(GEMMA_TYPES))
    assert gemma_like(types=moved).fingerprint() != base.fingerprint()  # so is which layer slides
    no_window = KVLayout("gemma", 18, 1, 256, dtype="bfloat16", layer_types=GEMMA_TYPES)
    assert no_window.fingerprint() != base.fingerprint()
    full, sliding = base.part_layout("full"), base.part_layout("sliding")
    assert (full.num_layers, sliding.num_layers, full.sliding_window, sliding.sliding_window) == (3, 15, 0, 512)
    assert full.part == f"full/{base.fingerprint().hex()}"
    assert KVLayout.from_dict(sliding.to_dict()) == sliding
    assert len({base.fingerprint(), full.fingerprint(), sliding.fingerprint(),
                gemma_like(1024).part_layout("full").fingerprint()}) == 4


def test_bad_layouts_are_refused():
    with pytest.raises(InvalidRequest, match="sliding_window"):
        KVLayout("m", 2, 1, 8, layer_types=("full_attention",) * 2, sliding_window=16)
    with pytest.raises(InvalidRequest, match="sliding_window"):
        KVLayout("m", 2, 1, 8, layer_types=("full_attention", "sliding_attention"), sliding_window=-1)
    with pytest.raises(InvalidRequest, match="part"):
        KVLayout("m", 2, 1, 8, part="half/00")
    with pytest.raises(InvalidRequest, match="not supported"):
        KVLayout("m", 2, 1, 8, layer_types=("full_attention", "linear_attention")).is_hybrid  # noqa: B018
    with pytest.raises(InvalidRequest, match="need sliding_window"):
        KVLayout("m", 2, 1, 8, layer_types=("full_attention", "sliding_attention")).layers_of("full")
    with pytest.raises(InvalidRequest, match="no parts"):
        gemma_like().part_layout("full").part_layout("full")


def test_window_keys_commit_to_the_boundary_and_window():
    sliding = gemma_like().part_layout("sliding")
    keys = [k for _, k in prefix_keys(list(range(512)), "t", gemma_like().part_layout("full").fingerprint(), "raw",
                                      256)]
    fp = sliding.fingerprint()
    w0, w1 = window_key(keys[0], fp, 512), window_key(keys[1], fp, 512)
    assert w0 != w1 and w0 != window_key(keys[0], fp, 256) and w0.kind is KeyKind.PREFIX
    assert w0.fingerprint == fp and w0.digest not in {k.digest for k in keys}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("hyb"))
    c.start_controller()
    c.start_node("node-a")
    c.wait_nodes(1)
    yield c
    c.close()


def test_all_full_hybrid_client_is_a_plain_client(cluster):
    layout = KVLayout("llama-like", 4, 2, 16, dtype="float32")
    toks = list(range(100, 400))
    kv = torch.randn(layout.shape(len(toks)))
    with HybridClient(layout, controller=cluster.address, chunk_size=64, tenant="t-plain") as hyb, \
            KDNClient(layout, controller=cluster.address, chunk_size=64, tenant="t-plain") as plain:
        assert hyb.store(toks, kv).result(30).stored == 5  # 4 full chunks and the partial one, as before
        assert plain.lookup(toks).hit_tokens == len(toks)
        got = plain.retrieve(toks)
        assert got.num_tokens == len(toks) and torch.equal(got.kv, kv)
        assert hyb.lookup(toks).hit_tokens == len(toks)


def test_hybrid_client_refuses_bad_input(cluster):
    layout = KVLayout("tiny-hybrid", 3, 1, 8, dtype="float32",
                      layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=32)
    with pytest.raises(InvalidRequest, match="part layout"):
        HybridClient(layout.part_layout("full"), controller=cluster.address)
    with HybridClient(layout, controller=cluster.address, chunk_size=16, tenant="t-bad") as hyb:
        with pytest.raises(InvalidRequest):
            hyb.store(list(range(40)), torch.zeros(layout.shape(39)))  # one token short
        with pytest.raises(InvalidRequest):
            hyb.store(list(range(40)), torch.zeros((2, 2, 40, 1, 8)))  # wrong layer count
        assert hyb.store(list(range(10)), torch.zeros(layout.shape(10))).result(10).stored == 0  # no whole chunk
        kv = torch.randn(layout.shape(40))
        res = hyb.store(list(range(40)), kv).result(30)
        assert (res.stored, res.boundaries) == (2, [32])  # whole chunks only; the window at the last one
        assert hyb.lookup(list(range(40))).hit_tokens == 32
        n, got = hyb.retrieve(list(range(40)))
        assert n == 32 and torch.equal(got[1], kv[1, :, :32]) and torch.equal(got[0], kv[0, :, :32])  # W = 32
