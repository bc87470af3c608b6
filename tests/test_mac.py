"""Forgery-proof chunk objects: keyed BLAKE3 section digests and a header MAC (kdn/format/mac.py).

The attacker can write a durable tier (the disk directory, Redis) and read genuine objects, but holds no secret:
every forgery the issue lists — an object moved under another tenant's key with its checksum recomputed, its
sections permuted and re-checksummed, a consistent new payload, a stripped signature, a wrong secret — must be
refused by a keyring holder, on the format level, by a real node over gRPC, and on fetch from a real disk tier and
a real redis-server.
"""

from __future__ import annotations

import struct
import uuid

import blake3
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdn.config import load_config
from kdn.errors import ConfigError, CorruptObject
from kdn.format.chunk import FLAG_SIGNED, ChunkHeader, build_object, header_length, parse_header, verify_object
from kdn.format.chunk_codec import decode_chunk, encode_chunk, get_codec, iter_layer_groups
from kdn.format.keys import prefix_keys
from kdn.format.layout import KVLayout
from kdn.format.mac import ForgedObject, Keyring, load_keyring
from tests.servers import redis_server  # noqa: F401 - fixture

LAYOUT = KVLayout("m", 4, 2, 8, "bfloat16")
TOKENS = list(range(40))
MALLORY = str(prefix_keys(TOKENS, "mallory", LAYOUT.fingerprint(), "raw", 10)[0][1])
VICTIM = str(prefix_keys(TOKENS, "victim", LAYOUT.fingerprint(), "raw", 10)[0][1])
SECRET_1 = "k1-" + "a" * 61
SECRET_2 = "k2-" + "b" * 61
RING = Keyring({"k1": SECRET_1})


def kv(n=10, seed=0) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(n), generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def signed(key=MALLORY, keyring=RING, seed=0, group=1) -> bytes:
    return encode_chunk(kv(seed=seed), key=key, layout=LAYOUT, codec="raw", layer_group=group, keyring=keyring)


# -- the attacker's own serializer: rewrites a signed object's fields, keeps what it cannot compute ----------------
def _str(value: str) -> bytes:
    return bytes([len(value)]) + value.encode()


def forge(obj: bytes, *, key: str | None = None, table: list[tuple[int, int, int, int, bytes]] | None = None,
          payloads: list[bytes] | None = None, mac: bytes | None = None) -> bytes:
    """``obj`` re-serialized with fields replaced; offsets, lengths and the header checksum made consistent.

    ``table`` entries are ``(layer_start, layer_end, length, xxh3, digest)``; the key id and (unless given) the
    MAC are copied from ``obj`` — the attacker cannot compute a MAC.
    """
    h = parse_header(obj)
    sections = [bytes(obj[s.offset:s.offset + s.length]) for s in h.sections]
    payloads = sections if payloads is None else payloads
    if table is None:
        table = [(s.layer_start, s.layer_end, s.length, s.checksum, s.digest) for s in h.sections]
    mac = bytes(obj[h.header_len - 32:h.header_len]) if mac is None else mac
    body = (_str(h.codec) + _str(key or h.key)
            + struct.pack("<16sIIHH", h.fingerprint, h.num_tokens, h.start, h.num_layers, len(table))
            + struct.pack("<I", len(h.codec_meta)) + h.codec_meta
            + b"".join(struct.pack("<HHIQQ", ls, le, 0, n, c) + d for ls, le, n, c, d in table)
            + _str(h.key_id) + mac)
    header_len = 28 + len(body)
    fixed = struct.pack("<4sHHIQQ", b"KDNC", 2, FLAG_SIGNED, header_len, sum(len(p) for p in payloads), 0)
    checksum = xxhash.xxh3_64_intdigest(fixed + body)
    return fixed[:20] + struct.pack("<Q", checksum) + body + b"".join(payloads)


def rechecksum(obj: bytes | bytearray) -> bytes:
    """Recompute the header checksum of a mutated object (anyone can)."""
    out = bytearray(obj)
    n = struct.unpack_from("<I", out, 8)[0]
    out[20:28] = b"\0" * 8
    out[20:28] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(out[:n])))
    return bytes(out)


def assert_forged(obj: bytes, key: str = VICTIM, keyring: Keyring = RING) -> None:
    """A keyring holder refuses ``obj`` as ``key`` (format level, header-only and layer-wise readers too)."""
    with pytest.raises(ForgedObject):
        verify_object(obj, key=key, fingerprint=LAYOUT.fingerprint(), codec="raw", keyring=keyring)
    with pytest.raises(ForgedObject):
        decode_chunk(obj, key=key, layout=LAYOUT, codec=get_codec("raw", LAYOUT), keyring=keyring)
    with pytest.raises(ForgedObject):
        list(iter_layer_groups(obj, key=key, layout=LAYOUT, codec=get_codec("raw", LAYOUT), keyring=keyring))


# -- format level -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 3, 4])
def test_signed_round_trip_and_checksum_only_readers(group):
    obj = signed(group=group)
    header = verify_object(obj, key=MALLORY, keyring=RING)
    assert header.signed and header.authenticated and header.key_id == "k1"
    assert all(len(s.digest) == 32 for s in header.sections)
    assert torch.equal(decode_chunk(obj, key=MALLORY, layout=LAYOUT, codec=get_codec("raw", LAYOUT), keyring=RING),
                       kv())
    layers = list(iter_layer_groups(obj, key=MALLORY, layout=LAYOUT, codec=get_codec("raw", LAYOUT), keyring=RING))
    assert torch.equal(torch.cat([t for _, _, t in layers]), kv())
    plain = verify_object(obj, key=MALLORY)  # a reader without keys checks the checksums as before
    assert plain.signed and not plain.authenticated
    assert signed(group=group) == obj  # deterministic


def test_moved_under_another_tenants_key_with_checksum_recomputed():
    moved = forge(signed(), key=VICTIM)
    assert verify_object(moved, key=VICTIM).key == VICTIM  # the attack works against checksums alone
    assert_forged(moved)
    # Same-length rewrite of the tenant only (no field shifts), checksum recomputed.
    other = MALLORY.replace("mallory", "mallorz")
    assert len(other) == len(MALLORY)
    raw = signed()
    n = header_length(raw)
    patched = rechecksum(raw[:n].replace(MALLORY.encode(), other.encode()) + raw[n:])
    verify_object(patched, key=other)
    assert_forged(patched, key=other)


def test_sections_permuted_and_rechecksummed():
    obj = signed(group=1)
    h = parse_header(obj)
    payloads = [bytes(obj[s.offset:s.offset + s.length]) for s in h.sections]
    entries = [(s.layer_start, s.layer_end, s.length, s.checksum, s.digest) for s in h.sections]
    # 1. payloads swapped, table entries' layer ranges kept: each section's digest now names other bytes.
    swapped = [payloads[1], payloads[0], *payloads[2:]]
    table = [(e[0], e[1], e[2], xxhash.xxh3_64_intdigest(p), entries[i if i > 1 else 1 - i][4])
             for i, (e, p) in enumerate(zip(entries, swapped))]
    permuted = forge(obj, key=MALLORY, table=table, payloads=swapped)
    verify_object(permuted, key=MALLORY)  # consistent checksums: would have been wrong KV
    assert_forged(permuted, key=MALLORY)
    # 2. whole entries permuted with their layer ranges relabelled, so the layers still cover [0, n) in order.
    relabelled = [(entries[i][0], entries[i][1], *entries[j][2:]) for i, j in enumerate([1, 0, 3, 2])]
    permuted = forge(obj, table=relabelled, payloads=[payloads[j] for j in [1, 0, 3, 2]])
    verify_object(permuted, key=MALLORY)
    assert_forged(permuted, key=MALLORY)
    # 3. payload bytes swapped under an untouched header: the keyed digests catch it (and the checksums do too).
    n = h.header_len
    body = b"".join([payloads[1], payloads[0], *payloads[2:]])
    with pytest.raises(ForgedObject, match="section digest"):
        verify_object(obj[:n] + body, key=MALLORY, keyring=RING)


def test_consistent_new_payload():
    obj = signed()
    h = parse_header(obj)
    evil = encode_chunk(kv(seed=9), key=MALLORY, layout=LAYOUT, codec="raw")  # what the attacker wants served
    payloads = [bytes(evil[s.offset:s.offset + s.length]) for s in parse_header(evil).sections]
    for digest in ("kept", "unkeyed"):
        table = [(s.layer_start, s.layer_end, len(p), xxhash.xxh3_64_intdigest(p),
                  s.digest if digest == "kept" else blake3.blake3(p).digest()) for s, p in zip(h.sections, payloads)]
        forged = forge(obj, table=table, payloads=payloads)
        assert torch.equal(decode_chunk(forged, key=MALLORY, layout=LAYOUT, codec=get_codec("raw", LAYOUT)),
                           kv(seed=9))  # checksums only: the forgery decodes to the attacker's KV
        assert_forged(forged, key=MALLORY)
    # A whole object signed with a guessed secret under the real key id.
    guessed = signed(keyring=Keyring({"k1": "guess-" + "c" * 58}), seed=9)
    assert_forged(guessed, key=MALLORY)
    # A MAC field replaced by anything the attacker can compute.
    assert_forged(forge(obj, mac=blake3.blake3(obj[:h.header_len - 32]).digest()), key=MALLORY)


def test_unsigned_objects_are_misses_for_keyring_holders():
    plain = encode_chunk(kv(), key=MALLORY, layout=LAYOUT, codec="raw")
    verify_object(plain, key=MALLORY)
    with pytest.raises(ForgedObject, match="unsigned"):
        verify_object(plain, key=MALLORY, keyring=RING)
    with pytest.raises(ForgedObject, match="unsigned"):
        parse_header(plain[:header_length(plain)], RING)
    # A signed object stripped of its signature (flag cleared, digests and MAC cut, checksum recomputed).
    h = parse_header(signed())
    stripped = build_object(codec="raw", key=MALLORY, fingerprint=h.fingerprint, num_tokens=h.num_tokens,
                            start=h.start, num_layers=h.num_layers,
                            sections=[(s.layer_start, s.layer_end, bytes(signed()[s.offset:s.offset + s.length]))
                                      for s in h.sections])
    verify_object(stripped, key=MALLORY)
    with pytest.raises(ForgedObject):
        verify_object(stripped, key=MALLORY, keyring=RING)
    # Setting the flag on an unsigned object: the header no longer parses.
    flagged = bytearray(plain)
    struct.pack_into("<H", flagged, 6, FLAG_SIGNED)
    with pytest.raises(CorruptObject):
        verify_object(rechecksum(flagged), key=MALLORY, keyring=RING)


def test_old_versions_and_unknown_flags_are_clean_misses():
    for obj in (encode_chunk(kv(), key=MALLORY, layout=LAYOUT, codec="raw"), signed()):
        for version, flags, match in ((1, None, "version 1"), (3, None, "version 3"), (2, 0x8001, "flags")):
            m = bytearray(obj)
            struct.pack_into("<H", m, 4, version)
            if flags is not None:
                struct.pack_into("<H", m, 6, flags)
            for keyring in (None, RING):
                with pytest.raises(CorruptObject, match=match):
                    verify_object(rechecksum(m), key=MALLORY, keyring=keyring)


def test_key_rotation():
    old = signed(keyring=RING)
    both = Keyring({"k1": SECRET_1, "k2": SECRET_2})  # the last key listed signs
    assert both.active == "k2" and both.key_ids == ("k1", "k2")
    new = signed(keyring=both)
    assert parse_header(new).key_id == "k2"
    assert verify_object(old, key=MALLORY, keyring=both).key_id == "k1"  # the old key id still verifies
    assert verify_object(new, key=MALLORY, keyring=both).key_id == "k2"
    with pytest.raises(ForgedObject, match="unknown MAC key id"):
        verify_object(new, key=MALLORY, keyring=RING)  # a node not yet given k2
    retired = Keyring({"k2": SECRET_2})
    with pytest.raises(ForgedObject, match="unknown MAC key id"):
        verify_object(old, key=MALLORY, keyring=retired)
    assert Keyring({"k1": SECRET_1, "k2": SECRET_2}, active="k1").active == "k1"
    # Same secret under another key id: the id is bound by the MAC.
    renamed = forge(old)  # sanity: forge() round-trips a genuine object
    assert renamed == old
    relabel = Keyring({"k1": SECRET_1, "k9": SECRET_1})
    h = parse_header(old)
    n = h.header_len
    swapped = rechecksum(old[:n - 34] + b"k9" + old[n - 32:])
    assert parse_header(swapped).key_id == "k9"
    with pytest.raises(ForgedObject):
        verify_object(swapped, key=MALLORY, keyring=relabel)


_OBJ = signed(group=2)
_HLEN = header_length(_OBJ)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, _HLEN - 1), st.integers(1, 255)), min_size=1, max_size=6),
       st.booleans())
def test_random_header_mutations_never_verify(edits, fix_checksum):
    m = bytearray(_OBJ)
    for pos, xor in edits:
        m[pos] ^= xor
    mutant = rechecksum(m) if fix_checksum else bytes(m)
    if mutant == _OBJ:
        return
    with pytest.raises(CorruptObject):
        verify_object(mutant, key=MALLORY, fingerprint=LAYOUT.fingerprint(), codec="raw", keyring=RING)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_OBJ) - _HLEN - 1), st.integers(1, 255))
def test_random_payload_edits_with_consistent_checksums_never_verify(pos, xor):
    h = parse_header(_OBJ)
    payloads = [bytearray(_OBJ[s.offset:s.offset + s.length]) for s in h.sections]
    i = 0
    while pos >= len(payloads[i]):
        pos -= len(payloads[i])
        i += 1
    payloads[i][pos] ^= xor
    table = [(s.layer_start, s.layer_end, s.length, xxhash.xxh3_64_intdigest(bytes(p)), s.digest)
             for s, p in zip(h.sections, payloads)]
    forged = forge(_OBJ, table=table, payloads=[bytes(p) for p in payloads])
    verify_object(forged, key=MALLORY)
    with pytest.raises(ForgedObject):
        verify_object(forged, key=MALLORY, keyring=RING)


# -- keyring loading ----------------------------------------------------------------------------------------------
def test_load_keyring_from_file_env_and_config(tmp_path):
    assert load_keyring(None, environ={}) is None
    path = tmp_path / "mac.keys"
    path.write_text(f"# KDN MAC keys\nk1: {SECRET_1}\n\nk2: {SECRET_2}\n")
    config = load_config(environ={}, overrides={"security.mac_keys_file": str(path)})
    ring = load_keyring(config.security, environ={})
    assert ring.key_ids == ("k1", "k2") and ring.active == "k2"
    assert load_keyring(config.client, environ={}).key_ids == ("k1", "k2")  # the client inherits the section
    assert load_keyring(config, environ={}).active == "k2"
    assert SECRET_1 not in repr(ring) and SECRET_2 not in repr(ring) and "k2" in repr(ring)
    pinned = load_config(environ={}, overrides={"security.mac_keys_file": str(path), "security.mac_active_key": "k1"})
    assert load_keyring(pinned, environ={}).active == "k1"
    env = load_keyring(None, environ={"KDN_MAC_KEYS_FILE": str(path), "KDN_MAC_KEY": f"k3:{'d' * 40}"})
    assert env.key_ids == ("k1", "k2", "k3") and env.active == "k3"
    assert load_keyring(None, environ={"KDN_MAC_KEY": "e" * 40}).key_ids == ("env",)
    obj = signed(keyring=ring)
    assert verify_object(obj, key=MALLORY, keyring=load_keyring(config, environ={})).key_id == "k2"


@pytest.mark.parametrize("text, match", [
    (f"k1: {'x' * 31}\n", "shorter than 32"),
    (f"k1: {SECRET_1}\nk1: {SECRET_2}\n", "listed twice"),
    ("just a line\n", "line 1"),
    (f"bad id!: {SECRET_1}\n", "key id"),
    ("", "no MAC keys"),
])
def test_bad_key_files_are_config_errors_that_hide_secrets(tmp_path, text, match):
    path = tmp_path / "mac.keys"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_keyring(None, environ={"KDN_MAC_KEYS_FILE": str(path)}) if text else \
            load_keyring(type("S", (), {"mac_keys_file": "", "mac_active_key": "k1"})(), environ={})
    assert "x" * 31 not in str(info.value) and SECRET_2 not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_keyring(None, environ={"KDN_MAC_KEYS_FILE": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="not in the keyring"):
        Keyring({"k1": SECRET_1}, active="k2")


# -- real node and real durable tiers -----------------------------------------------------------------------------
@pytest.fixture
def mac_cluster(tmp_path, redis_server):  # noqa: F811
    from tests.cluster import Cluster

    keys = tmp_path / "mac.keys"
    keys.write_text(f"k1: {SECRET_1}\n")
    c = Cluster(tmp_path, env={"KDN_MAC_KEYS_FILE": str(keys)})
    c.start_controller()
    prefix = f"kdnmac:{uuid.uuid4().hex}:"
    c.start_node("disk-node", "[{kind: disk, capacity: 64MiB}]")
    c.start_node("redis-node", f"[{{kind: redis, url: '{redis_server.url}', key_prefix: '{prefix}', capacity: 64MiB}}]")
    c.wait_nodes(2)
    c.redis_prefix = prefix
    c.redis_url = redis_server.url
    yield c
    c.close()


def _node_client(proc):
    from kdn.client.transport import NodeClient

    return NodeClient(proc.ready["node"], proc.ready["bulk"], tenant="victim")


def test_node_with_keyring_refuses_forged_and_unsigned_puts(mac_cluster):
    good = signed(key=VICTIM)
    moved = forge(signed(key=MALLORY), key=VICTIM)
    unsigned = encode_chunk(kv(), key=VICTIM, layout=LAYOUT, codec="raw")
    guessed = signed(key=VICTIM, keyring=Keyring({"k1": "guess-" + "c" * 58}))
    for proc in mac_cluster.nodes:
        with _node_client(proc) as nc:
            results = nc.put_many_detailed([(VICTIM, moved), (VICTIM, unsigned), (VICTIM, guessed)])
            assert [ok for ok, _ in results] == [False, False, False], results
            assert "MAC" in results[0][1] and "unsigned" in results[1][1] and "MAC" in results[2][1]
            assert nc.get_many([VICTIM]) == [None]
            assert nc.stats().corrupt_dropped == 3  # counted
            assert nc.put_many([(VICTIM, good)]) == [True]
            assert bytes(nc.get_many([VICTIM])[0]) == good


def _overwrite_on_disk(proc, root, key: str, data: bytes) -> None:
    import hashlib

    name = hashlib.blake2b(key.encode(), digest_size=20, person=b"kdn-disk-v1").hexdigest()
    (path,) = list((root / "disk-node" / "disk").rglob(name + "*"))
    path.write_bytes(data)


def test_forgeries_written_into_disk_and_redis_are_misses_on_get(mac_cluster, tmp_path):
    import redis

    good = signed(key=VICTIM)
    evil = encode_chunk(kv(seed=9), key=VICTIM, layout=LAYOUT, codec="raw")
    h = parse_header(good)
    payloads = [bytes(evil[s.offset:s.offset + s.length]) for s in parse_header(evil).sections]
    consistent = forge(good, table=[(s.layer_start, s.layer_end, len(p), xxhash.xxh3_64_intdigest(p), s.digest)
                                    for s, p in zip(h.sections, payloads)], payloads=payloads)
    moved = forge(signed(key=MALLORY, seed=9), key=VICTIM)
    disk, red = mac_cluster.nodes
    served = {"disk": 0, "redis": 0}
    for forged in (consistent, moved):
        for proc in (disk, red):
            with _node_client(proc) as nc:
                assert nc.put_many([(VICTIM, good)]) == [True]
        # The attacker writes the durable tiers directly, behind the nodes' backs.
        _overwrite_on_disk(disk, tmp_path, VICTIM, forged)
        client = redis.Redis.from_url(mac_cluster.redis_url)
        client.set(mac_cluster.redis_prefix + VICTIM, forged)
        client.close()
        for proc in (disk, red):
            with _node_client(proc) as nc:
                (got,) = nc.get_many([VICTIM])
            if got is None:  # the tier noticed on its own: a miss already
                continue
            got = bytes(got)
            served["disk" if proc is disk else "redis"] += 1
            assert got == forged
            verify_object(got, key=VICTIM, fingerprint=LAYOUT.fingerprint(), codec="raw")  # checksums pass
            assert_forged(got)  # a client holding the keyring: a miss, never the attacker's KV
            with _node_client(proc) as nc:
                nc.delete_many([VICTIM])
    # The disk tier verifies with the node's keyring (docs/security.md, "Healing"): a miss at the node already. The
    # Redis tier checks checksums only: its forgeries reached the reader, who refused them.
    assert served == {"disk": 0, "redis": 2}


def test_header_type_is_unchanged_for_callers():
    h = parse_header(signed())
    assert isinstance(h, ChunkHeader) and h.total_len == len(signed())
