"""Chunk keys: prefix chains, partial chunks, content keys, scoping by tenant, layout and codec."""

from __future__ import annotations

import pytest

from kdn.errors import InvalidRequest
from kdn.format.keys import ChunkKey, KeyKind, chunk_spans, content_key, prefix_keys
from kdn.format.layout import KVLayout

FP = KVLayout("m", 2, 1, 8).fingerprint()


def test_spans_full_and_partial():
    assert [(s.start, s.end) for s in chunk_spans(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.start, s.end) for s in chunk_spans(10, 4, include_partial=False)] == [(0, 4), (4, 8)]
    assert [(s.start, s.end) for s in chunk_spans(8, 4)] == [(0, 4), (4, 8)]
    assert chunk_spans(3, 4, include_partial=False) == []
    with pytest.raises(InvalidRequest):
        chunk_spans(3, 0)


def test_prefix_chain_depends_on_everything_before():
    a = prefix_keys(list(range(12)), "t", FP, "raw", 4)
    b = prefix_keys([99] + list(range(1, 12)), "t", FP, "raw", 4)
    assert all(ka != kb for (_, ka), (_, kb) in zip(a, b))
    c = prefix_keys(list(range(8)) + [5, 5, 5, 5], "t", FP, "raw", 4)
    assert [k for _, k in c[:2]] == [k for _, k in a[:2]] and c[2][1] != a[2][1]


def test_partial_chunk_key_differs_from_full_chunk_key():
    short = prefix_keys(list(range(10)), "t", FP, "raw", 4)
    long = prefix_keys(list(range(12)), "t", FP, "raw", 4)
    assert short[2][1] != long[2][1]
    assert short[2][0].num_tokens == 2


def test_scoping_by_tenant_fingerprint_codec():
    toks = list(range(8))
    base = prefix_keys(toks, "t", FP, "raw", 4)[0][1]
    assert prefix_keys(toks, "u", FP, "raw", 4)[0][1].digest != base.digest
    other_fp = KVLayout("m", 2, 1, 8, revision="x").fingerprint()
    assert prefix_keys(toks, "t", other_fp, "raw", 4)[0][1].digest != base.digest
    assert str(prefix_keys(toks, "t", FP, "lz4", 4)[0][1]) != str(base)


def test_key_string_round_trip_and_validation():
    key = prefix_keys(list(range(4)), "acme", FP, "raw", 4)[0][1]
    assert ChunkKey.parse(str(key)) == key
    ck = content_key([1, 2, 3], "acme", FP, "raw")
    assert ck.kind is KeyKind.CONTENT and ChunkKey.parse(str(ck)) == ck
    assert content_key([1, 2, 3], "acme", FP, "raw") == ck
    for bad in ["", "acme", "a/b/c/d", str(key) + "0", "../" + str(key)]:
        with pytest.raises(InvalidRequest):
            ChunkKey.parse(bad)
    with pytest.raises(InvalidRequest):
        prefix_keys([1], "bad/tenant", FP, "raw", 4)
    with pytest.raises(InvalidRequest):
        prefix_keys([-1], "t", FP, "raw", 4)


def test_tokens_accept_tensors_and_arrays():
    import numpy as np
    import torch

    toks = list(range(9))
    expected = prefix_keys(toks, "t", FP, "raw", 4)
    assert prefix_keys(torch.tensor(toks), "t", FP, "raw", 4) == expected
    assert prefix_keys(np.array(toks), "t", FP, "raw", 4) == expected
