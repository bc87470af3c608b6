"""The same-host shared-memory data path (kdn.wire.shm) through real node processes and real unix sockets."""

from __future__ import annotations

import gc
import socket
import threading

import pytest
import torch

from kdn.client import KDNClient
from kdn.client.same_host import SharedRawSource, fast_source
from kdn.client.transport import NodeClient
from kdn.config import load_config
from kdn.errors import AuthError
from kdn.node.servicer import StorageNode
from kdn.node.tiers.shared import SharedMemoryTier
from kdn.wire.shm import ShmClient, is_shared, socket_name
from tests.cluster import Cluster

CHUNK = 16


def kv_for(layout, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(n), generator=g).to(torch.bfloat16)


@pytest.fixture
def one_node(tmp_path):
    c = Cluster(tmp_path)
    c.start_controller()
    c.start_node("node-a")
    c.wait_nodes(1)
    yield c
    c.close()


def test_round_trip_in_place_bit_identical(one_node, layout):
    tokens = list(range(7 * CHUNK + 5))
    kv = kv_for(layout, len(tokens))
    with KDNClient(layout, controller=one_node.address, chunk_size=CHUNK) as client:
        assert client.store(tokens, kv).result(30).stored == 8
        stream = client.retrieve_layers(tokens)
        assert stream.num_tokens == len(tokens)
        assert all(is_shared(data) for _, data, _ in stream.objects), "same host: objects read in place"
        for _, data, header in stream.objects:  # payloads page-aligned in the arena (full-speed DMA)
            assert (data.obj.offset + header.header_len) % 4096 == 0
        source = fast_source(stream)
        assert isinstance(source, SharedRawSource)
        out = torch.full(layout.shape(len(tokens)), float("nan"), dtype=torch.bfloat16)
        for start, end in source.groups():
            source.decode_group(start, end, out[start:end])
        assert torch.equal(out, kv)
        source.batch_on_host = True  # the GPU path's batches (stage, then one placing copy) on host tensors
        out.fill_(float("nan"))
        for start, end in source.groups():
            source.decode_group(start, end, out[start:end])
        assert torch.equal(out, kv)
        got = client.retrieve(tokens)
        assert torch.equal(got.kv, kv)
    with KDNClient(layout, controller=one_node.address, chunk_size=CHUNK, shared_memory=False) as remote:
        stream = remote.retrieve_layers(tokens)
        assert stream.num_tokens == len(tokens) and not any(is_shared(d) for _, d, _ in stream.objects)
        assert fast_source(stream) is stream


def test_content_chunks_zero_copy(one_node, layout):
    """get_chunks(zero_copy=True): raw objects come back as CPU tensors over the node's shared arena (no copy),
    equal to what was stored; other clients and objects get decoded copies."""
    from kdn.format.keys import content_key

    kvs = [kv_for(layout, n, seed=n) for n in (CHUNK, 2 * CHUNK + 3, 5)]
    with KDNClient(layout, controller=one_node.address, chunk_size=CHUNK) as client:
        keys = [content_key(list(range(i, i + kv.shape[2])), client.config.tenant, client.fingerprint, "raw")
                for i, kv in enumerate(kvs)]
        assert all(client.put_chunks([(k, kv, 0) for k, kv in zip(keys, kvs)]))
        views = client.get_chunks([*keys, content_key([99], "default", client.fingerprint, "raw")], zero_copy=True)
        assert views[-1] is None  # a miss stays a miss
        arena = one_node_arena(client)
        for view, kv in zip(views, kvs):
            assert torch.equal(view, kv)
            assert arena[0] <= view.data_ptr() < arena[1], "read in place from the mapped arena"
        copies = client.get_chunks(keys[1:])  # default: decoded copies
        assert all(torch.equal(c, kv) for c, kv in zip(copies, kvs[1:]))
        assert not any(arena[0] <= c.data_ptr() < arena[1] for c in copies)
    with KDNClient(layout, controller=one_node.address, chunk_size=CHUNK, shared_memory=False) as remote:
        got = remote.get_chunks(keys[1:], zero_copy=True)  # no shared memory: copies, same values
        assert all(torch.equal(g, kv) for g, kv in zip(got, kvs[1:]))


def one_node_arena(client: KDNClient) -> tuple[int, int]:
    """Address range of the (single) node's mapped arena in this client."""
    for node in client._node_clients.values():
        mapping = getattr(getattr(node, "_shm", None), "_mapping", None)
        if mapping is not None:
            base = mapping.tensor().data_ptr()
            return base, base + mapping.size
    raise AssertionError("no shared arena mapped")


@pytest.fixture
def local_node(tmp_path):
    """A node in this process (its tier's lease count is visible); clients still use its real unix socket."""
    cfg = load_config(overrides={"node.port": 0, "node.bulk_port": 0, "node.controller": "",
                                 "data_dir": str(tmp_path), "node.tiers": [{"kind": "memory", "capacity": "1MiB"}],
                                 "auth.tokens": {"t-acme": "acme", "t-globex": "globex"}})
    node = StorageNode(cfg).start()
    yield node
    node.stop()


def _objects(layout, tenant: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    from codec import get_codec
    from kdn.format.chunk_codec import encode_chunk
    from kdn.format.keys import prefix_keys

    tokens = list(range(seed * 10_000, seed * 10_000 + n * CHUNK))
    kv = kv_for(layout, len(tokens), seed)
    codec = get_codec("raw", layout)
    return [(str(key), encode_chunk(kv[:, :, s.start:s.end], key=str(key), layout=layout, codec=codec,
                                    start=s.start))
            for s, key in prefix_keys(tokens, tenant, layout.fingerprint(), "raw", CHUNK)]


def test_leases_keep_bytes_until_released(local_node, layout):
    tier = local_node.store.tiers[0]
    assert isinstance(tier, SharedMemoryTier)
    writer = NodeClient(local_node.address, local_node.bulk_address, tenant="acme", token="t-acme")
    first = _objects(layout, "acme", 2, seed=1)
    assert writer.put_many(first) == [True, True]
    shm = ShmClient(local_node.address, tenant="acme", token="t-acme")
    held = shm.get_many([first[0][0]])[0]
    assert held is not None and bytes(held) == first[0][1]
    assert tier.outstanding_leases == 1
    assert writer.delete_many([first[0][0]]) == [True]  # hidden at once, but its bytes stay while leased
    for seed in range(2, 12):  # ~10 MiB of puts through a 1 MiB arena: everything unleased is evicted
        writer.put_many(_objects(layout, "acme", 2, seed=seed))
    assert bytes(held) == first[0][1], "a leased object was overwritten"
    assert tier.outstanding_leases == 1
    view = memoryview(held)[100:200]
    del held
    gc.collect()
    assert tier.outstanding_leases == 1, "a view derived from the buffer keeps the lease"
    del view
    gc.collect()
    deadline = threading.Event()
    for _ in range(50):
        if tier.outstanding_leases == 0:
            break
        deadline.wait(0.02)
    assert tier.outstanding_leases == 0
    shm.close()
    writer.close()


def test_other_tenants_keys_are_misses_and_bad_tokens_refused(local_node, layout):
    objs = _objects(layout, "acme", 2, seed=3)
    with NodeClient(local_node.address, local_node.bulk_address, tenant="acme", token="t-acme") as writer:
        assert writer.put_many(objs) == [True, True]
    spy = ShmClient(local_node.address, tenant="acme", token="t-globex")  # claims acme with a globex token
    assert spy.get_many([k for k, _ in objs]) == [None, None]
    assert local_node.store.tiers[0].outstanding_leases == 0
    spy.close()
    with pytest.raises(AuthError):
        ShmClient(local_node.address, tenant="acme", token="wrong").get_many([objs[0][0]])


def test_falls_back_to_the_network_when_shared_memory_cannot_be_used(tmp_path, layout):
    tokens = list(range(3 * CHUNK))
    kv = kv_for(layout, len(tokens))
    c = Cluster(tmp_path)
    try:
        c.start_controller()
        c.start_node("private", extra=["--set", "node.shared_memory=false"])
        c.wait_nodes(1)
        with KDNClient(layout, controller=c.address, chunk_size=CHUNK) as client:
            client.store(tokens, kv).result(30)
            stream = client.retrieve_layers(tokens)
            assert stream.num_tokens == len(tokens) and not any(is_shared(d) for _, d, _ in stream.objects)
            assert torch.equal(client.retrieve(tokens).kv, kv)
        # A squatter on the node's socket name (no arena, wrong protocol): the client still gets the right KV.
        address = c.nodes[0].ready["node"]
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        squatter.bind("\0" + socket_name(address))
        squatter.listen(4)

        def serve() -> None:
            conn, _ = squatter.accept()
            conn.sendall(b"\x10\x00\x00\x00" + b"garbage garbage!")
            conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with KDNClient(layout, controller=c.address, chunk_size=CHUNK) as client:
            assert torch.equal(client.retrieve(tokens).kv, kv)
        thread.join(5)
        squatter.close()
    finally:
        c.close()


def test_node_killed_mid_read(one_node, layout):
    tokens = list(range(4 * CHUNK))
    kv = kv_for(layout, len(tokens))
    with KDNClient(layout, controller=one_node.address, chunk_size=CHUNK, timeout_s=2.0) as client:
        client.store(tokens, kv).result(30)
        stream = client.retrieve_layers(tokens)
        assert all(is_shared(d) for _, d, _ in stream.objects)
        one_node.nodes[0].kill()
        out = torch.empty(layout.shape(len(tokens)), dtype=torch.bfloat16)
        source = fast_source(stream)
        for start, end in source.groups():  # the mapping outlives the node: the read in flight completes
            source.decode_group(start, end, out[start:end])
        assert torch.equal(out, kv)
        del stream, source
        assert client.retrieve(tokens).num_tokens == 0  # then a miss (the engine recomputes), no crash


def test_layer_groups_widen_and_strided_batches():
    from kdn.client.same_host import _extends, _widen

    assert _widen([(i, i + 1) for i in range(10)], 4) == [(0, 4), (4, 8), (8, 10)]
    arena, other = object(), object()
    batch = [(0, 16, 1000, arena), (16, 16, 2000, arena)]
    assert _extends(batch, (32, 16, 3000, arena), 800)  # next tokens, same size, same stride: one strided copy
    assert not _extends(batch, (48, 16, 3000, arena), 800)  # not the next tokens
    assert not _extends(batch, (32, 8, 3000, arena), 800)  # another size (a partial chunk)
    assert not _extends(batch, (32, 16, 3500, arena), 800)  # another stride
    assert not _extends(batch, (32, 16, 3000, other), 800)  # another arena
    assert not _extends(batch[:1], (16, 16, 1500, arena), 800)  # overlapping rows cannot be one 2D copy
