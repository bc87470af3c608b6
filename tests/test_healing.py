"""A detected bad copy heals (docs/security.md, "Healing"): it is dropped where it lies, the controller stops listing
it, a re-store of the prefix is not skipped as "already present", a bad memory copy never shadows a good disk copy,
and a client that gets a bad copy reports it to the node (``ReportBad``).

Real controller processes; nodes are real processes (disk tier corrupted from outside) or run in this process with
their real gRPC and bulk servers (to corrupt the bytes their memory tier holds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from kdn import KDNClient, KVLayout
from kdn.config import load_config
from kdn.node.servicer import StorageNode
from tests.cluster import Cluster

LAYOUT = KVLayout(model_id="healing-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
CHUNK = 32
PROMPTS = 30


def _prompt(i: int) -> list[int]:
    return list(range(i * 1000, i * 1000 + 2 * CHUNK))  # two full chunks each


def _kv(i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(LAYOUT.shape(2 * CHUNK), generator=gen).to(torch.float16)


def _client(address: str) -> KDNClient:
    return KDNClient(LAYOUT, controller=address, chunk_size=CHUNK, shared_memory=False, store_partial=False,
                     timeout_s=20.0)


def _store_all(client: KDNClient) -> list:
    return [client.store(_prompt(i), _kv(i)).result(timeout=60) for i in range(PROMPTS)]


def _wait(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def _listed(client: KDNClient) -> int:
    """Prompts whose every chunk the controller lists."""
    return sum(client.lookup(_prompt(i)).hit_tokens == 2 * CHUNK for i in range(PROMPTS))


def _unlisted(client: KDNClient) -> int:
    return sum(client.lookup(_prompt(i)).hit_tokens == 0 for i in range(PROMPTS))


def _flip_payload_byte(data, header_len: int) -> None:
    """Flip a byte in the middle of the payload of a mutable object."""
    at = header_len + (len(data) - header_len) // 2
    data[at] ^= 0x5A


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.start_controller()
    yield c
    c.close()


def test_corrupt_disk_copies_become_misses_then_restores_hit_again(cluster):
    """30 prompts on a real node process's disk tier, every object file corrupted from outside: retrieves miss,
    the controller stops listing them, re-stores are stored (not skipped) and hit with the right KV."""
    from kdn.format.chunk import parse_header

    cluster.start_node("d", tiers="[{kind: disk, capacity: 64MiB, fsync: never}]")
    cluster.wait_nodes(1)
    with _client(cluster.address) as client:
        assert sum(r.stored for r in _store_all(client)) == 2 * PROMPTS
        _wait(lambda: _listed(client) == PROMPTS, "stored prompts not listed")
        files = [p for p in Path(cluster.root / "d" / "disk").rglob("*.kdn")]
        assert len(files) == 2 * PROMPTS
        for path in files:
            data = bytearray(path.read_bytes())
            _flip_payload_byte(data, parse_header(data).header_len)
            path.write_bytes(data)
        for i in range(PROMPTS):
            assert client.retrieve(_prompt(i)).num_tokens == 0
        _wait(lambda: _unlisted(client) == PROMPTS, "bad copies still listed by the controller")
        again = _store_all(client)
        assert sum(r.stored for r in again) == 2 * PROMPTS and sum(r.skipped for r in again) == 0
        _wait(lambda: _listed(client) == PROMPTS, "re-stored prompts not listed")
        for i in range(PROMPTS):
            got = client.retrieve(_prompt(i))
            assert got.num_tokens == 2 * CHUNK and torch.equal(got.kv, _kv(i))


def _local_node(cluster: Cluster, tmp_path: Path, tiers: list) -> StorageNode:
    cfg = load_config(overrides={"node.port": 0, "node.bulk_port": 0, "node.controller": cluster.address,
                                 "node.node_id": "local", "node.shared_memory": False,
                                 "node.heartbeat_interval_s": 0.3, "data_dir": str(tmp_path / "local"),
                                 "node.tiers": tiers})
    return StorageNode(cfg).start()


def _corrupt_memory_tier(node: StorageNode) -> int:
    from kdn.format.chunk import parse_header

    memory = node.store.tier("memory")
    count = 0
    for key, _ in list(memory.keys()):
        data = memory.get(key)
        assert not memoryview(data).readonly  # the tier holds the received buffer itself (writable here)
        _flip_payload_byte(data, parse_header(data).header_len)
        count += 1
    return count


def test_client_reports_bad_memory_copies_and_the_good_disk_copy_serves(cluster, tmp_path):
    """A bad memory-tier copy (payload damage: only a full check finds it) is reported by the client that got it;
    the node drops it, the good disk copy stays listed and serves the next retrieve."""
    node = _local_node(cluster, tmp_path, [{"kind": "memory", "capacity": "64MiB"},
                                          {"kind": "disk", "capacity": "64MiB", "fsync": "never"}])
    try:
        cluster.wait_nodes(1)
        with _client(cluster.address) as client:
            assert sum(r.stored for r in _store_all(client)) == 2 * PROMPTS
            _wait(lambda: _listed(client) == PROMPTS, "stored prompts not listed")
            assert _corrupt_memory_tier(node) == 2 * PROMPTS
            first = [client.retrieve(_prompt(i)) for i in range(PROMPTS)]
            assert all(r.num_tokens == 0 for r in first)  # only the node's memory copy was asked for
            memory = node.store.tier("memory")
            _wait(lambda: not any(memory.contains_many([k for k, _ in node.store.tier("disk").keys()])),
                  "reported copies not dropped from the memory tier")
            assert node.counters["corrupt"] == 2 * PROMPTS
            for i in range(PROMPTS):  # still listed (disk), served from disk (and promoted again)
                got = client.retrieve(_prompt(i))
                assert got.num_tokens == 2 * CHUNK and torch.equal(got.kv, _kv(i))
    finally:
        node.stop()


def test_bad_header_in_memory_falls_through_to_disk_within_one_get(cluster, tmp_path):
    """Damage a get's header check finds (the key's bytes) is dropped at once and the disk copy answers the same
    get: a corrupt memory copy never shadows a good disk copy."""
    node = _local_node(cluster, tmp_path, [{"kind": "memory", "capacity": "64MiB"},
                                          {"kind": "disk", "capacity": "64MiB", "fsync": "never"}])
    try:
        cluster.wait_nodes(1)
        with _client(cluster.address) as client:
            client.store(_prompt(0), _kv(0)).result(timeout=60)
            memory = node.store.tier("memory")
            for key, _ in list(memory.keys()):
                memory.get(key)[40] ^= 0x01  # inside the header: its checksum no longer matches
            got = client.retrieve(_prompt(0))
            assert got.num_tokens == 2 * CHUNK and torch.equal(got.kv, _kv(0))
            assert node.store.dropped == 2
    finally:
        node.stop()


def test_memory_only_copies_reported_bad_are_unlisted_and_restored(cluster, tmp_path):
    node = _local_node(cluster, tmp_path, [{"kind": "memory", "capacity": "64MiB"}])
    try:
        cluster.wait_nodes(1)
        with _client(cluster.address) as client:
            _store_all(client)
            _wait(lambda: _listed(client) == PROMPTS, "stored prompts not listed")
            _corrupt_memory_tier(node)
            assert all(client.retrieve(_prompt(i)).num_tokens == 0 for i in range(PROMPTS))
            _wait(lambda: _unlisted(client) == PROMPTS, "reported copies still listed")
            again = _store_all(client)
            assert sum(r.stored for r in again) == 2 * PROMPTS
            _wait(lambda: _listed(client) == PROMPTS, "re-stored prompts not listed")
            assert all(torch.equal(client.retrieve(_prompt(i)).kv, _kv(i)) for i in range(PROMPTS))
    finally:
        node.stop()


def test_report_bad_keeps_good_copies_and_other_tenants_keys(tmp_path):
    """A report is a hint: the node drops only copies that fail its own check, and only the caller's keys."""
    from kdn.client.transport import NodeClient
    from kdn.v1 import data_pb2

    cfg = load_config(overrides={"node.port": 0, "node.bulk_port": 0, "node.controller": "",
                                 "node.shared_memory": False, "data_dir": str(tmp_path),
                                 "node.tiers": [{"kind": "memory", "capacity": "16MiB"}],
                                 "auth.tokens": {"t-acme": "acme", "t-globex": "globex"}})
    node = StorageNode(cfg).start()
    try:
        from codec import get_codec
        from kdn.format.chunk_codec import encode_chunk
        from kdn.format.keys import prefix_keys

        kv = _kv(1)
        objects = [(str(key), encode_chunk(kv[:, :, s.start:s.end], key=str(key), layout=LAYOUT,
                                           codec=get_codec("raw", LAYOUT), start=s.start))
                   for s, key in prefix_keys(_prompt(1), "acme", LAYOUT.fingerprint(), "raw", CHUNK)]
        with NodeClient(node.address, tenant="acme", token="t-acme", transport="grpc") as acme, \
                NodeClient(node.address, tenant="globex", token="t-globex", transport="grpc") as globex:
            assert acme.put_many(objects) == [True, True]
            keys = [k for k, _ in objects]
            _corrupt_memory_tier(node)  # both copies bad now
            assert list(globex._stub.ReportBad(data_pb2.KeysRequest(keys=keys), metadata=globex.metadata,
                                               timeout=10).dropped) == [False, False]
            assert acme.contains_many(keys) == ["memory", "memory"]  # another tenant's report changes nothing
            memory = node.store.tier("memory")
            memory.delete(keys[1])
            memory.put(keys[1], objects[1][1])  # a good copy again
            reply = acme._stub.ReportBad(data_pb2.KeysRequest(keys=keys), metadata=acme.metadata, timeout=10)
            assert list(reply.dropped) == [True, False]
            assert acme.contains_many(keys) == ["", "memory"]
    finally:
        node.stop()


def test_disk_start_up_check_drops_foreign_fingerprint_codec_and_unsigned_objects(tmp_path):
    from kdn.format.chunk import build_object
    from kdn.format.keys import prefix_keys
    from kdn.format.mac import Keyring
    from kdn.node.tiers.disk import DiskTier, _file_name

    fp = LAYOUT.fingerprint()
    keys = [str(k) for _, k in prefix_keys(list(range(4 * CHUNK)), "acme", fp, "raw", CHUNK)]
    ring = Keyring({"k1": "x" * 40})
    good = dict(codec="raw", fingerprint=fp, num_tokens=CHUNK, start=0, num_layers=1, sections=[(0, 1, b"kv" * 64)])
    objects = {
        keys[0]: build_object(key=keys[0], keyring=ring, **good),                          # good
        keys[1]: build_object(key=keys[1], keyring=ring, **{**good, "fingerprint": bytes(16)}),  # other layout
        keys[2]: build_object(key=keys[2], keyring=ring, **{**good, "codec": "lz4"}),        # other codec
        keys[3]: build_object(key=keys[3], **good),                                        # unsigned
    }
    root = tmp_path / "disk"
    for key, data in objects.items():
        name = _file_name(key)
        (root / name[:2]).mkdir(parents=True, exist_ok=True)
        (root / name[:2] / name).write_bytes(data)
    for check_payload in (False, True):
        tier = DiskTier(str(root), 1 << 20, fsync="never", verify_on_start=check_payload, keyring=ring)
        try:
            assert [k for k, _ in tier.keys()] == [keys[0]]
        finally:
            tier.close()
    assert sorted(p.name for p in root.rglob("*.kdn")) == [_file_name(keys[0])]


def test_disk_tier_skips_non_regular_and_oversized_files_at_start_and_on_reads(tmp_path):
    """A FIFO, a symlink to /dev/zero and a sparse 2 GiB file in the directory: start-up skips them (no hang, no
    MemoryError, nothing read), and a live read of a file swapped for one of them is a miss."""
    import resource

    from kdn.format.chunk import build_object
    from kdn.format.keys import prefix_keys
    from kdn.node.tiers.disk import DiskTier, _file_name

    fp = LAYOUT.fingerprint()
    keys = [str(k) for _, k in prefix_keys(list(range(5 * CHUNK)), "acme", fp, "raw", CHUNK)]
    root = tmp_path / "disk"
    paths = []
    for key in keys:
        name = _file_name(key)
        (root / name[:2]).mkdir(parents=True, exist_ok=True)
        paths.append(root / name[:2] / name)
    os.mkfifo(paths[0])
    os.symlink("/dev/zero", paths[1])
    with open(paths[2], "wb") as f:
        f.truncate(2 << 30)  # sparse
    good = [build_object(key=k, codec="raw", fingerprint=fp, num_tokens=CHUNK, start=0, num_layers=1,
                         sections=[(0, 1, b"kv" * 64)]) for k in keys[3:]]
    for path, data in zip(paths[3:], good):
        path.write_bytes(data)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tier = DiskTier(str(root), 64 << 20, fsync="never", max_object_bytes=16 << 20)
    try:
        assert sorted(k for k, _ in tier.keys()) == sorted(keys[3:])
        assert paths[0].exists() and paths[1].is_symlink()  # skipped, not ours to remove
        assert not paths[2].exists()  # a regular file that cannot be an object: dropped without reading it
        assert tier.get(keys[3]) == good[0]
        # Swap live objects for a FIFO and a symlink to /dev/zero: the reads are misses, not hangs or huge reads.
        paths[3].unlink()
        os.mkfifo(paths[3])
        paths[4].unlink()
        os.symlink("/dev/zero", paths[4])
        assert tier.get_many(keys[3:]) == [None, None]
        assert [k for k, _ in tier.keys()] == []
    finally:
        tier.close()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < (256 << 10)  # KiB: far below 2 GiB
