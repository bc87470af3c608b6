"""End to end through real processes: a controller, two storage nodes, clients over real sockets."""

from __future__ import annotations

import time

import pytest
import torch

from kdn.client import KDNClient
from kdn.client.transport import NodeClient
from kdn.errors import InvalidRequest
from kdn.format.chunk import build_object
from kdn.format.layout import KVLayout

CHUNK = 16


def kv_for(layout: KVLayout, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(n), generator=g).to(torch.bfloat16)


def make_client(cluster, layout, **kw) -> KDNClient:
    kw.setdefault("chunk_size", CHUNK)
    return KDNClient(layout, controller=cluster.address, **kw)


@pytest.mark.parametrize("codec", ["raw", "lz4"])
@pytest.mark.parametrize("transport", ["shm", "bulk", "grpc"])
def test_round_trip_bit_identical_across_clients(cluster, layout, codec, transport):
    tokens = list(range(1000, 1000 + 7 * CHUNK + 5))  # 7 full chunks and a partial one
    kv = kv_for(layout, len(tokens))
    # "shm": same-host shared memory first (the default); "bulk": the TCP bulk channel alone; "grpc": gRPC alone.
    options = {"transport": "grpc" if transport == "grpc" else "bulk", "shared_memory": transport == "shm"}
    with make_client(cluster, layout, codec=codec, **options) as writer:
        result = writer.store(tokens, kv).result(30)
        assert (result.stored, result.failed) == (8, 0), result
    # A second client that only knows the controller finds and fetches every chunk.
    with make_client(cluster, layout, codec=codec, **options) as reader:
        assert reader.lookup(tokens).hit_tokens == len(tokens)
        got = reader.retrieve(tokens)
        assert got.num_tokens == len(tokens)
        assert torch.equal(got.kv, kv)
        holders = {n.node_id for c in reader.lookup(tokens).chunks for n in c.nodes}
        assert holders == {"node-a", "node-b"}, "placement should spread chunks over both nodes"


def test_prefix_semantics(cluster, layout):
    base = list(range(5 * CHUNK + 3))
    kv = kv_for(layout, len(base))
    with make_client(cluster, layout) as client:
        assert client.store(base, kv).result(30).stored == 6
        for k in range(6):
            other = base[:k * CHUNK] + [7] * (3 * CHUNK)
            assert client.lookup(other).hit_tokens == k * CHUNK
        # Same prompt: the partial last chunk hits too; a longer prompt never uses the partial chunk.
        assert client.lookup(base).hit_tokens == len(base)
        assert client.lookup(base + [1, 2, 3]).hit_tokens == 5 * CHUNK
        got = client.retrieve(base[:3 * CHUNK] + [9] * 40)
        assert got.num_tokens == 3 * CHUNK and torch.equal(got.kv, kv[:, :, :3 * CHUNK])
        limited = client.retrieve(base, max_tokens=2 * CHUNK + 5)
        assert limited.num_tokens == 2 * CHUNK


def test_tenants_and_layouts_are_isolated(cluster, layout):
    tokens = list(range(4 * CHUNK))
    with make_client(cluster, layout, tenant="acme") as acme:
        acme.store(tokens, kv_for(layout, len(tokens))).result(30)
        assert acme.lookup(tokens).hit_tokens == len(tokens)
    with make_client(cluster, layout, tenant="globex") as globex:
        assert globex.lookup(tokens).hit_tokens == 0
        assert globex.retrieve(tokens).kv is None
    other_layout = KVLayout(layout.model_id, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                            layout.dtype, revision="other")
    with make_client(cluster, other_layout, tenant="acme") as foreign:
        assert foreign.lookup(tokens).hit_tokens == 0


def test_bad_tensors_get_clear_errors(cluster, layout):
    with make_client(cluster, layout) as client:
        with pytest.raises(InvalidRequest, match="dtype"):
            client.store(list(range(8)), torch.zeros(layout.shape(8), dtype=torch.float32))
        with pytest.raises(InvalidRequest, match="shape"):
            client.store(list(range(8)), torch.zeros((4, 2, 8, 3, 16), dtype=torch.bfloat16))
        with pytest.raises(InvalidRequest, match="tokens"):
            client.store(list(range(9)), kv_for(layout, 8))
        with pytest.raises(InvalidRequest, match="codec"):
            make_client(cluster, layout, codec="nope")


def test_corrupt_and_foreign_objects_are_refused_by_nodes(cluster, layout):
    tokens = list(range(2 * CHUNK))
    kv = kv_for(layout, len(tokens))
    with make_client(cluster, layout) as client:
        (span0, key0), (span1, key1) = client.keys(tokens)
        from kdn.format.chunk_codec import encode_chunk

        good = encode_chunk(kv[:, :, :CHUNK], key=str(key0), layout=layout, codec="raw")
        flipped = bytearray(good)
        flipped[-100] ^= 0x10
        node = cluster.nodes[0].ready
        with NodeClient(node["node"], node["bulk"]) as nc:
            results = nc.put_many_detailed([(str(key0), bytes(flipped)), (str(key1), good), (str(key0), good[:50]),
                                            ("not/a/key", good)])
            assert [ok for ok, _ in results] == [False, False, False, False]
            assert "checksum" in results[0][1] and "another key" in results[1][1]
            # Garbage that merely claims to be an object of the right key is refused too.
            fake = build_object(codec="raw", key=str(key0), fingerprint=b"\0" * 16, num_tokens=CHUNK, start=0,
                                num_layers=layout.num_layers, sections=[(0, layout.num_layers, b"x" * 10)])
            assert nc.put_many([(str(key0), fake)]) == [True]  # intact object, but of another layout
        # ...which the client rejects on fetch by fingerprint: a miss, never wrong KV.
        time.sleep(0.5)
        got = client.retrieve(tokens)
        assert got.num_tokens == 0 and got.kv is None


def test_controller_down_degrades_to_known_nodes_then_miss(cluster, layout):
    tokens = list(range(3 * CHUNK))
    kv = kv_for(layout, len(tokens))
    with make_client(cluster, layout, timeout_s=2.0) as client:
        client.store(tokens, kv).result(30)
        client.refresh_nodes()
        cluster.controller.kill()
        found = client.lookup(tokens)
        assert found.source == "nodes" and found.hit_tokens == len(tokens)
        got = client.retrieve(tokens)
        assert got.num_tokens == len(tokens) and torch.equal(got.kv, kv)
        # Stores fail quietly (the result says why); nothing raises into the caller.
        assert client.store(list(range(500, 520)), kv_for(layout, 20)).result(30).error
    with make_client(cluster, layout, timeout_s=1.0) as fresh:
        assert fresh.lookup(tokens).hit_tokens == 0
        assert fresh.retrieve(tokens).kv is None


def test_controller_restart_rebuilds_index_from_nodes(cluster, layout):
    tokens = list(range(4 * CHUNK))
    kv = kv_for(layout, len(tokens))
    with make_client(cluster, layout) as client:
        client.store(tokens, kv).result(30)
    port = int(cluster.address.rsplit(":", 1)[1])
    cluster.controller.kill()
    cluster.start_controller(port=port)
    deadline = time.monotonic() + 15
    with make_client(cluster, layout, timeout_s=2.0) as client:
        while client.lookup(tokens).hit_tokens < len(tokens):
            assert time.monotonic() < deadline, "index not rebuilt from node inventories"
            time.sleep(0.2)
        assert torch.equal(client.retrieve(tokens).kv, kv)


def test_dead_node_means_partial_hit_not_error(cluster, layout):
    tokens = list(range(8 * CHUNK))
    kv = kv_for(layout, len(tokens))
    with make_client(cluster, layout, timeout_s=2.0) as client:
        client.store(tokens, kv).result(30)
        found = client.lookup(tokens)
        first_on_b = next(i for i, c in enumerate(found.chunks) if c.nodes[0].node_id == "node-b")
        cluster.nodes[1].kill()
        got = client.retrieve(tokens)
        assert got.num_tokens == first_on_b * CHUNK
        if got.num_tokens:
            assert torch.equal(got.kv, kv[:, :, :got.num_tokens])


def test_auth_tokens_scope_tenants(tmp_path, layout):
    from kdn.errors import AuthError
    from tests.cluster import Cluster

    tokens = {"admin-secret": "@admin", "node-secret": "@node", "acme-secret": "acme", "globex-secret": "globex"}
    yaml_tokens = "{" + ", ".join(f"{k}: '{v}'" for k, v in tokens.items()) + "}"
    c = Cluster(tmp_path, common=["--set", f"auth.tokens={yaml_tokens}"], admin_token="admin-secret")
    try:
        c.start_controller()
        c.start_node("node-a", extra=["--set", "node.token=node-secret"])
        c.wait_nodes(1)
        prompt = list(range(2 * CHUNK))
        with KDNClient(layout, controller=c.address, chunk_size=CHUNK, tenant="acme", token="acme-secret") as acme:
            assert acme.store(prompt, kv_for(layout, len(prompt))).result(30).stored == 2
            assert acme.lookup(prompt).hit_tokens == len(prompt)
        with KDNClient(layout, controller=c.address, chunk_size=CHUNK, tenant="acme",
                       token="globex-secret") as spoof:
            # A globex token cannot see acme's keys even when it claims tenant "acme".
            assert spoof.lookup(prompt).hit_tokens == 0
            assert spoof.store(prompt, kv_for(layout, len(prompt))).result(30).stored == 0
        with KDNClient(layout, controller=c.address, chunk_size=CHUNK, token="wrong") as bad:
            with pytest.raises(AuthError):
                bad.lookup(prompt)
    finally:
        c.close()


def test_node_killed_mid_write_serves_every_acknowledged_chunk_after_restart(tmp_path, layout):
    import threading

    from tests.cluster import Cluster

    c = Cluster(tmp_path)
    disk = "[{kind: disk, capacity: 256MiB}]"
    try:
        c.start_controller()
        c.start_node("disk-node", tiers=disk)
        c.wait_nodes(1)
        acked: list[tuple[list[int], torch.Tensor]] = []
        stop = threading.Event()

        def writer():
            with make_client(c, layout, timeout_s=2.0) as client:
                i = 0
                while not stop.is_set() and i < 2000:
                    tokens = [i] * (2 * CHUNK)
                    kv = kv_for(layout, len(tokens), seed=i)
                    result = client.store(tokens, kv).result(10)
                    if result.stored == 2 and not result.failed:
                        acked.append((tokens, kv))
                    i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 20
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        c.nodes[0].kill()
        stop.set()
        thread.join(30)
        assert len(acked) >= 20
        c.nodes.clear()
        c.start_node("disk-node", tiers=disk)
        c.wait_nodes(1)
        with make_client(c, layout) as client:
            for tokens, kv in acked:
                # A loaded machine may time a call out (a miss by design): allow a few attempts, not a loss.
                deadline = time.monotonic() + 20
                while (got := client.retrieve(tokens)).num_tokens < len(tokens):
                    assert time.monotonic() < deadline, "an acknowledged chunk was lost"
                    time.sleep(0.2)
                assert torch.equal(got.kv, kv)
        assert not list((tmp_path / "disk-node").rglob(".tmp-*")), "temp files left behind"
    finally:
        c.close()
