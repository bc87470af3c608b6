"""A seeded few thousand fuzz cases over every parser that reads outside bytes (``kdn bench fuzz`` runs 100,000;
docs/security.md, "Fuzzing"), and regressions for what the fuzzer found."""

from __future__ import annotations

import tempfile
import threading

import grpc
import pytest

from kdn.bench.fuzz import Findings, _chunk_world, run_all


def test_seeded_fuzz_of_every_target_finds_no_crash_hang_or_wrong_kv():
    findings = run_all(8000, seed=20, hang_s=10.0, hypothesis_share=0.2)
    assert findings.total() >= 7900
    assert set(findings.counts) >= {"chunk", "chunk-keyring", "header", "codec-raw", "codec-lz4", "codec-lossless",
                                    "codec-cachegen-default", "bulk", "shm", "grpc"}
    assert findings.bad == 0, findings.examples
    # The fuzz reached past the parsers' first checks: some mutated inputs were still valid and accepted ...
    assert sum(findings.counts[t].get("accepted", 0) for t in ("chunk", "shm", "grpc")) > 0
    # ... and with a keyring no forgery is ever accepted, while checksums alone cannot refuse consistent ones.
    assert findings.counts["chunk-keyring"].get("accepted-forgery", 0) == 0
    assert findings.counts["chunk"].get("accepted-forgery", 0) > 0


def test_findings_count_bad_outcomes():
    f = Findings()
    f.add("x", "refused")
    f.add("x", "wrong-kv", "detail")
    assert f.bad == 1 and f.total() == 2 and f.examples == ["x: wrong-kv: detail"]


def test_forged_token_count_is_a_miss_not_a_huge_allocation():
    """Found by the fuzzer: a header (checksum recomputed, no keyring) declaring 2^31 tokens made decode_chunk
    allocate hundreds of GB and raise RuntimeError."""
    import struct

    from kdn.errors import CorruptObject
    from kdn.format.chunk import build_object, parse_header
    from kdn.format.chunk_codec import decode_chunk

    world = _chunk_world("raw", 1)
    h = parse_header(world.plain)
    sections = [(s.layer_start, s.layer_end, world.plain[s.offset:s.offset + s.length]) for s in h.sections]
    forged = build_object(codec=h.codec, key=world.key, fingerprint=h.fingerprint, num_tokens=(1 << 31) - 1,
                          start=0, num_layers=h.num_layers, sections=sections)
    assert struct.unpack_from("<I", forged, 0)[0]  # a well-formed object apart from its token count
    with pytest.raises(CorruptObject, match="declares"):
        decode_chunk(forged, key=world.key, layout=world.layout, codec=world.codec)


def test_malformed_put_stream_does_not_keep_the_node_from_stopping():
    """Found by the fuzzer: one undecodable frame on the client-streamed Put left the call unfinished (the handler
    answered a call gRPC had ended), so ``StorageNode.stop()`` waited forever."""
    from kdn.config import load_config
    from kdn.node.servicer import StorageNode
    from kdn.wire.rpc import make_channel

    with tempfile.TemporaryDirectory() as root:
        node = StorageNode(load_config(overrides={
            "node.port": 0, "node.bulk_port": -1, "node.controller": "", "node.shared_memory": False,
            "data_dir": root, "node.tiers": [{"kind": "memory", "capacity": "1MiB"}]})).start()
        with make_channel(node.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.stream_unary("/kdn.v1.Data/Put")(iter([b"\xff\xff\xff"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
        stopper = threading.Thread(target=node.stop, args=(0,), daemon=True)
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "node.stop() hangs after a malformed Put stream"
