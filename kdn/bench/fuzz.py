"""``kdn bench fuzz``: mutation fuzzing of every parser that reads bytes from outside (docs/security.md, "Fuzzing").

Targets, each fed mutations of valid inputs (bit flips, byte runs, zeroed and 0xFF regions, truncation, extension,
splices, planted length fields) and, for chunk objects, the adversarial forgeries of issue 20 (headers re-keyed to
another tenant, fingerprint or codec with the checksum recomputed, sections permuted and re-checksummed, consistent
new payloads, objects signed with a foreign secret or with another tenant's derived key, unsigned objects):

- ``chunk`` / ``chunk-keyring``: ``verify_object`` and ``decode_chunk`` of mutated objects without / with a keyring;
- ``header``: ``parse_header`` of mutated and random header bytes;
- ``codec-<name>``: each codec's ``decode`` of mutated section streams (raw, lz4, lossless, cachegen-default);
- ``bulk``: mutated bulk-channel sessions (hello, GET and PUT) over real sockets to a real node's bulk server;
- ``shm``: the shared-memory LEASE/RELEASE parsers, and mutated sessions over the node's real unix socket;
- ``grpc``: mutated serialized requests to every Data and Control method over a real gRPC channel.

Outcomes per case: ``refused`` (a clear error or a miss), ``accepted`` (the input was valid, or a forgery that
checksums cannot tell from a valid object: expected only without a keyring), ``crash`` (any other exception, a
handler's traceback logged at ERROR, an INTERNAL/UNKNOWN gRPC status, a dead server), ``hang`` (a case slower than
``--hang-s``, or a server that neither answers nor closes), ``wrong-kv`` (a chunk that verified and decoded to other
KV than it was built from, or a node that serves other bytes than were stored). Cases come from a seeded random
mutator (fast) and from hypothesis's generator (``--hypothesis-share`` of each target's mutation programs).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

__all__ = ["add_arguments", "run", "Mutator", "Findings", "fuzz_chunks", "fuzz_header", "fuzz_codec", "fuzz_bulk",
           "fuzz_shm", "fuzz_grpc", "run_all"]

log = logging.getLogger(__name__)

_INTERESTING = (0, 1, 2, 7, 8, 63, 64, 127, 128, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
                1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1)


# -- mutations ---------------------------------------------------------------------------------------------------
class Mutator:
    """Seeded byte mutations; ``program(rng)`` draws a list of operations, ``apply`` runs one on a sample."""

    OPS = ("flip", "byte", "zero", "ff", "truncate", "extend", "insert", "delete", "dup", "splice", "int", "random")

    @staticmethod
    def program(rng: random.Random, size: int) -> list[tuple[str, int, int]]:
        return [(rng.choice(Mutator.OPS), rng.randrange(max(1, size)), rng.getrandbits(64))
                for _ in range(1 + min(4, int(rng.expovariate(1.0))))]

    @staticmethod
    def apply(data: bytes, program: list[tuple[str, int, int]], other: bytes = b"") -> bytes:
        buf = bytearray(data)
        for op, at, value in program:
            n = len(buf)
            at = at % max(1, n)
            run = 1 + value % 64
            if op == "flip" and n:
                buf[at] ^= 1 << (value % 8)
            elif op == "byte" and n:
                buf[at] = value & 0xFF
            elif op == "zero":
                buf[at:at + run] = bytes(len(buf[at:at + run]))
            elif op == "ff":
                buf[at:at + run] = b"\xff" * len(buf[at:at + run])
            elif op == "truncate":
                del buf[at:]
            elif op == "extend":
                buf += value.to_bytes(8, "little") * (1 + value % 8)
            elif op == "insert":
                buf[at:at] = value.to_bytes(8, "little")[:1 + value % 8]
            elif op == "delete":
                del buf[at:at + run]
            elif op == "dup":
                buf[at:at] = buf[at:at + run]
            elif op == "splice" and other:
                src = value % len(other)
                buf[at:at + run] = other[src:src + run]
            elif op == "int":
                width = (1, 2, 4, 8)[value % 4]
                number = _INTERESTING[(value >> 8) % len(_INTERESTING)] & ((1 << (8 * width)) - 1)
                buf[at:at + width] = number.to_bytes(width, "little")
            elif op == "random":
                buf = bytearray(random.Random(value).randbytes(value % 512))
        return bytes(buf)


# -- bookkeeping -------------------------------------------------------------------------------------------------
@dataclass
class Findings:
    """Counts per target and outcome, and the first few examples of each bad outcome."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, target: str, outcome: str, detail: str = "") -> None:
        per = self.counts.setdefault(target, {})
        per[outcome] = per.get(outcome, 0) + 1
        if outcome in ("crash", "hang", "wrong-kv") and len(self.examples) < 50:
            self.examples.append(f"{target}: {outcome}: {detail[:300]}")

    def total(self, outcome: str | None = None) -> int:
        return sum(n for per in self.counts.values() for o, n in per.items() if outcome is None or o == outcome)

    @property
    def bad(self) -> int:
        return self.total("crash") + self.total("hang") + self.total("wrong-kv")


class _ErrorLog(logging.Handler):
    """Collects ERROR records of ``kdn`` loggers (a handler's traceback is a crash, even when the server lives)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}"[:400])

    def take(self) -> list[str]:
        out, self.records = self.records, []
        return out


def _timed(findings: Findings, target: str, hang_s: float, fn: Callable[[], tuple[str, str]]) -> None:
    t0 = time.perf_counter()
    try:
        outcome, detail = fn()
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        outcome, detail = "crash", f"{type(exc).__name__}: {exc}"
    if time.perf_counter() - t0 > hang_s and outcome != "crash":
        outcome, detail = "hang", f"{time.perf_counter() - t0:.1f} s ({detail})"
    findings.add(target, outcome, detail)


def _cases(rng: random.Random, n: int, share: float, sample_size: int, seed: int) -> Iterator[list]:
    """``n`` mutation programs: ``1 - share`` from the seeded mutator, ``share`` drawn by hypothesis."""
    n_h = int(n * share)
    for _ in range(n - n_h):
        yield Mutator.program(rng, sample_size)
    if n_h:
        yield from _hypothesis_programs(n_h, sample_size, seed)


def _hypothesis_programs(n: int, size: int, seed: int) -> Iterator[list]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    drawn: list[list] = []
    ops = st.tuples(st.sampled_from(Mutator.OPS), st.integers(0, max(1, size) - 1), st.integers(0, (1 << 64) - 1))

    @settings(max_examples=n, database=None, deadline=None, derandomize=True, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(st.lists(ops, min_size=1, max_size=6), st.integers(0, 2 ** 32))
    def draw(program, salt):
        drawn.append(program)

    random.seed(seed)
    draw()
    yield from drawn[:n]


# -- chunk objects -----------------------------------------------------------------------------------------------
@dataclass
class _ChunkWorld:
    layout: Any
    codec: Any
    keyring: Any
    foreign: Any  # a keyring with another secret under the same key id
    key: str
    other_key: str
    kv: torch.Tensor
    plain: bytes
    signed: bytes
    other_plain: bytes
    other_signed: bytes
    impostor: Any = None  # the attacker tenant's own derived key filed under the victim's name


def _chunk_world(codec_name: str = "raw", layer_group: int = 1) -> _ChunkWorld:
    from kdn.format.chunk_codec import encode_chunk, get_codec
    from kdn.format.keys import prefix_keys
    from kdn.format.layout import KVLayout
    from kdn.format.mac import Keyring, derive_tenant_key

    layout = KVLayout(model_id="fuzz", num_layers=4, num_kv_heads=2, head_dim=8, dtype="float16")
    codec = get_codec(codec_name, layout)
    ring = Keyring({"k1": "s" * 40})
    foreign = Keyring({"k1": "t" * 40})
    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(layout.shape(32), generator=gen).to(torch.float16)
    (_, key), = prefix_keys(list(range(32)), "victim", layout.fingerprint(), codec_name, 32)
    (_, other), = prefix_keys(list(range(32)), "mallory", layout.fingerprint(), codec_name, 32)
    other_kv = torch.randn(layout.shape(32), generator=gen).to(torch.float16)

    def enc(k, t, r):
        return encode_chunk(t, key=str(k), layout=layout, codec=codec, layer_group=layer_group, keyring=r)
    impostor = Keyring(tenant_keys={("victim", "k1"): derive_tenant_key("s" * 40, "mallory", "k1")})
    return _ChunkWorld(layout, codec, ring, foreign, str(key), str(other), kv, enc(key, kv, None),
                       enc(key, kv, ring), enc(other, other_kv, None), enc(other, other_kv, ring), impostor)


def _recheck(data: bytearray) -> bytes:
    """Recompute the header checksum (what any writer without the secret can do)."""
    from kdn.format.chunk import header_length

    header_len = header_length(data)
    hdr = bytearray(data[:header_len])
    hdr[20:28] = bytes(8)
    data[20:28] = xxhash.xxh3_64_intdigest(bytes(hdr)).to_bytes(8, "little")
    return bytes(data)


def _forgeries(world: _ChunkWorld, signed: bool, rng: random.Random) -> Callable[[], bytes]:
    """Adversarial objects presented under the victim's key."""
    from kdn.format.chunk import build_object, parse_header

    source = world.other_signed if signed else world.other_plain
    mine = world.signed if signed else world.plain

    def rekey() -> bytes:  # another tenant's object with the victim's key written in, checksum recomputed
        h = parse_header(source)
        sections = [(s.layer_start, s.layer_end, source[s.offset:s.offset + s.length]) for s in h.sections]
        draw = rng.random()
        keyring = (world.foreign if draw < 0.35 else world.impostor if draw < 0.7 else None) if signed else None
        return build_object(codec=h.codec, key=world.key, fingerprint=h.fingerprint, num_tokens=h.num_tokens,
                            start=h.start, num_layers=h.num_layers, sections=sections, codec_meta=h.codec_meta,
                            keyring=keyring)

    def permute() -> bytes:  # the victim's own sections in another order, tables rebuilt, checksum recomputed
        h = parse_header(mine)
        payloads = [mine[s.offset:s.offset + s.length] for s in h.sections]
        order = list(range(len(payloads)))
        rng.shuffle(order)
        sections = [(s.layer_start, s.layer_end, payloads[j]) for s, j in zip(h.sections, order)]
        return build_object(codec=h.codec, key=world.key, fingerprint=h.fingerprint, num_tokens=h.num_tokens,
                            start=h.start, num_layers=h.num_layers, sections=sections, codec_meta=h.codec_meta)

    def new_payload() -> bytes:  # consistent new payload: section checksums and header checksum recomputed
        h = parse_header(mine)
        data = bytearray(mine)
        s = rng.choice(h.sections)
        data[s.offset:s.offset + s.length] = rng.randbytes(s.length)
        entry = 24 + (32 if h.signed else 0)
        pos = _table_at(mine) + h.sections.index(s) * entry
        digest = xxhash.xxh3_64_intdigest(bytes(data[s.offset:s.offset + s.length]))
        data[pos + 16:pos + 24] = digest.to_bytes(8, "little")
        return _recheck(data)

    def field_edit() -> bytes:  # tenant, fingerprint, codec or token fields edited in place, checksum recomputed
        data = bytearray(mine)
        at = rng.randrange(28, parse_header(mine).header_len)
        data[at] ^= 1 + rng.randrange(255)
        return _recheck(data)

    def unsigned() -> bytes:  # a plain object where a signed one is required
        return world.plain

    choices = [rekey, permute, new_payload, field_edit, unsigned]
    return lambda: rng.choice(choices)()


def _table_at(data: bytes) -> int:
    """Offset of the section table in a chunk header."""
    pos = 28
    pos += 1 + data[pos]
    pos += 1 + data[pos]
    pos += 28  # fingerprint, tokens, start, layers, sections
    (meta_len,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + meta_len


def _chunk_case(world: _ChunkWorld, data: bytes, keyring, forged: bool) -> tuple[str, str]:
    from kdn.errors import CorruptObject, InvalidRequest
    from kdn.format.chunk import verify_object
    from kdn.format.chunk_codec import decode_chunk

    try:
        verify_object(data, key=world.key, fingerprint=world.layout.fingerprint(), codec=world.codec.name,
                      keyring=keyring)
        kv = decode_chunk(data, key=world.key, layout=world.layout, codec=world.codec, keyring=keyring)
    except (CorruptObject, InvalidRequest) as exc:
        return "refused", type(exc).__name__
    if kv.shape == world.kv.shape and torch.equal(kv, world.kv):
        return "accepted", ""
    if forged and keyring is None:
        return "accepted-forgery", "checksums are not authentication (no keyring)"
    return "wrong-kv", f"{'forged' if forged else 'mutated'} object of {len(data)} bytes decoded to other KV"


def fuzz_chunks(findings: Findings, n: int, *, keyring: bool, seed: int, hang_s: float, share: float) -> None:
    target = "chunk-keyring" if keyring else "chunk"
    rng = random.Random(seed)
    worlds = [_chunk_world("raw", 1), _chunk_world("raw", 2), _chunk_world("lz4", 4)]
    t0 = time.perf_counter()
    forge = {id(w): _forgeries(w, keyring, rng) for w in worlds}
    for i, program in enumerate(_cases(rng, n, share, len(worlds[0].signed), seed)):
        world = worlds[i % len(worlds)]
        base = world.signed if keyring else world.plain
        ring = world.keyring if keyring else None
        if i % 4 == 3:  # a quarter of the cases are forgeries
            _timed(findings, target, hang_s,
                   lambda world=world, ring=ring: _chunk_case(world, forge[id(world)](), ring, True))
        else:
            data = Mutator.apply(base, program, world.other_signed)
            _timed(findings, target, hang_s,
                   lambda world=world, data=data, ring=ring: _chunk_case(world, data, ring, False))
    findings.seconds[target] = time.perf_counter() - t0


def fuzz_header(findings: Findings, n: int, *, seed: int, hang_s: float, share: float) -> None:
    from kdn.errors import CorruptObject
    from kdn.format.chunk import parse_header

    world = _chunk_world("raw", 1)
    rng = random.Random(seed + 1)
    samples = [world.plain[:200], world.signed[:400], world.signed]
    t0 = time.perf_counter()

    def case(data: bytes, ring) -> tuple[str, str]:
        try:
            parse_header(data, ring)
        except CorruptObject as exc:
            return "refused", type(exc).__name__
        return "accepted", ""

    for i, program in enumerate(_cases(rng, n, share, 400, seed)):
        data = Mutator.apply(samples[i % 3], program, world.other_signed)
        ring = world.keyring if i % 2 else None
        _timed(findings, "header", hang_s, lambda data=data, ring=ring: case(data, ring))
    findings.seconds["header"] = time.perf_counter() - t0


# -- codecs ------------------------------------------------------------------------------------------------------
def _codec_for(name: str):
    from codec import get_codec
    from codec.base import KVShape

    shape = KVShape(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")
    if not name.startswith("cachegen"):
        return get_codec(name, shape), shape
    from codec.profile import build_profile

    gen = torch.Generator().manual_seed(3)
    samples = [torch.randn(shape.shape(128), generator=gen).to(torch.bfloat16) for _ in range(2)]
    return get_codec(name, shape, profile=build_profile(samples, model_id="fuzz")), shape


def fuzz_codec(findings: Findings, name: str, n: int, *, seed: int, hang_s: float, share: float) -> None:
    from codec.errors import CodecError

    target = f"codec-{name}"
    codec, shape = _codec_for(name)
    gen = torch.Generator().manual_seed(seed)
    tokens = 64
    kv = torch.randn(shape.shape(tokens), generator=gen).to(torch.bfloat16)
    streams = [codec.encode(kv[:1], layer_start=0), codec.encode(kv[1:], layer_start=1)]
    meta = codec.meta()
    rng = random.Random(seed + hash(name) % 1000)
    t0 = time.perf_counter()

    def case(data: bytes, layer: int, toks: int, meta_bytes: bytes) -> tuple[str, str]:
        try:
            out = codec.decode(data, 1, toks, meta=meta_bytes, layer_start=layer)
        except CodecError as exc:
            return "refused", type(exc).__name__
        if tuple(out.shape) != shape.shape(toks, 1) or out.dtype != kv.dtype:
            return "crash", f"decode returned shape {tuple(out.shape)} {out.dtype}"
        return "accepted", ""

    for i, program in enumerate(_cases(rng, n, share, len(streams[0]), seed)):
        layer = i % 2
        data = Mutator.apply(streams[layer], program, streams[1 - layer])
        toks = tokens if i % 8 else rng.choice([0, 1, tokens - 1, tokens + 1, 4096])
        meta_bytes = meta if i % 16 else Mutator.apply(meta, Mutator.program(rng, len(meta) or 1))
        _timed(findings, target, hang_s,
               lambda data=data, layer=layer, toks=toks, meta_bytes=meta_bytes: case(data, layer, toks, meta_bytes))
    findings.seconds[target] = time.perf_counter() - t0


# -- a real node (bulk channel, shared memory, gRPC) ---------------------------------------------------------------
class _Servers:
    """A standalone node (memory tier in a shared arena, bulk channel, gRPC) and a controller, in this process."""

    def __init__(self, root: str) -> None:
        from kdn.config import load_config
        from kdn.controller.servicer import Controller
        from kdn.node.servicer import StorageNode

        tokens = {"t-acme": "acme", "t-globex": "globex", "t-admin": "@admin", "t-node": "@node"}
        self.controller = Controller(load_config(overrides={
            "controller.port": 0, "data_dir": os.path.join(root, "ctl"), "auth.tokens": tokens})).start()
        self.node = StorageNode(load_config(overrides={
            "node.port": 0, "node.bulk_port": 0, "node.controller": "", "node.shared_memory": True,
            "data_dir": os.path.join(root, "node"), "node.tiers": [{"kind": "memory", "capacity": "64MiB"}],
            "node.max_object_bytes": 8 << 20, "auth.tokens": tokens})).start()
        world = _chunk_world("raw", 1)
        from kdn.format.chunk_codec import encode_chunk
        from kdn.format.keys import prefix_keys

        (_, key), = prefix_keys(list(range(32)), "acme", world.layout.fingerprint(), "raw", 32)
        self.key = str(key)
        self.object = encode_chunk(world.kv, key=self.key, layout=world.layout, codec=world.codec)
        from kdn.wire.bulk_client import BulkClient

        with BulkClient(self.node.bulk_address, token="t-acme", tenant="acme") as bulk:
            assert bulk.put_many([(self.key, self.object)]) == [(True, "")]

    def healthy(self) -> str:
        """'' when the node still serves the stored object intact over the bulk channel; else what is wrong."""
        from kdn.wire.bulk_client import BulkClient

        try:
            with BulkClient(self.node.bulk_address, token="t-acme", tenant="acme", timeout_s=10) as bulk:
                got = bulk.get_many([self.key])[0]
        except Exception as exc:  # noqa: BLE001
            return f"crash: node stopped serving: {exc}"
        if got is None:  # deleted or evicted by a valid fuzzed call (Delete, Evict): store it again
            with BulkClient(self.node.bulk_address, token="t-acme", tenant="acme", timeout_s=10) as bulk:
                bulk.put_many([(self.key, self.object)])
            return ""
        if bytes(got) != self.object:
            return "wrong-kv: the stored object came back changed"
        return ""

    def close(self) -> None:
        self.node.stop(0)
        self.controller.stop(0)


def _session(sock: socket.socket, data: bytes, hang_s: float) -> tuple[str, str]:
    """Send ``data``, close our side, read until the server closes (a server that does neither is a hang)."""
    sock.settimeout(hang_s)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return "hang", f"no answer or close within {hang_s} s for {len(data)} bytes"
    except OSError as exc:
        return "refused", type(exc).__name__  # reset: the server closed with data unread
    return "refused", "closed"


def _bulk_samples(servers: _Servers) -> list[bytes]:
    from kdn.wire import bulk as b

    def block(*parts: bytes) -> bytes:
        data = b"".join(parts)
        return data + bytes(-len(data) % 64)

    token, tenant = b"t-acme", b"acme"
    hello = block(b._HELLO.pack(b.MAGIC, b.PROTOCOL_VERSION, len(token), len(tenant)), token, tenant)
    key = servers.key.encode()
    get = block(b._REQ.pack(b.OP_GET, 2), b._KEY.pack(len(key)), key, b._KEY.pack(9), b"acme/none")
    put = block(b._REQ.pack(b.OP_PUT, 1), b._PUT_ITEM.pack(len(key), len(servers.object)), key) + block(
        servers.object)
    return [hello + get, hello + put, hello + get + put, hello + put + get]


def fuzz_bulk(findings: Findings, servers: _Servers, errors: _ErrorLog, n: int, *, seed: int, hang_s: float,
              share: float) -> None:
    host, port = servers.node.bulk_address.rsplit(":", 1)
    samples = _bulk_samples(servers)
    rng = random.Random(seed + 2)
    t0 = time.perf_counter()
    for i, program in enumerate(_cases(rng, n, share, len(samples[0]), seed)):
        data = Mutator.apply(samples[i % len(samples)], program, samples[(i + 1) % len(samples)])

        def case(data=data) -> tuple[str, str]:
            with socket.create_connection((host, int(port)), timeout=hang_s) as sock:
                return _session(sock, data, hang_s)
        _timed(findings, "bulk", hang_s * 2, case)
        for record in errors.take():
            findings.add("bulk", "crash", record)
        if i % 500 == 499:
            _health(findings, "bulk", servers)
    _health(findings, "bulk", servers)
    findings.seconds["bulk"] = time.perf_counter() - t0


def _health(findings: Findings, target: str, servers: _Servers) -> None:
    problem = servers.healthy()
    if problem:
        outcome, _, detail = problem.partition(": ")
        findings.add(target, outcome, detail)


def fuzz_shm(findings: Findings, servers: _Servers, errors: _ErrorLog, n: int, *, seed: int, hang_s: float,
             share: float) -> None:
    from kdn.wire import shm

    rng = random.Random(seed + 3)
    key = servers.key.encode()
    lease = shm._REQ.pack(shm.OP_LEASE, 2) + shm._KEY.pack(len(key)) + key + shm._KEY.pack(9) + b"acme/none"
    release = shm._REQ.pack(shm.OP_RELEASE, 2) + shm._ID.pack(1) + shm._ID.pack(7)
    token, tenant = b"t-acme", b"acme"
    hello = shm._HELLO.pack(shm.MAGIC, shm.VERSION, len(token), len(tenant)) + token + tenant

    def frame(body: bytes) -> bytes:
        return shm._LEN.pack(len(body)) + body

    t0 = time.perf_counter()
    sockets = max(1, n // 10)  # the rest go straight to the parsers
    for i, program in enumerate(_cases(rng, n, share, len(lease), seed)):
        if i < sockets:
            parts = [hello, lease, release, lease]
            j = rng.randrange(len(parts))
            parts[j] = Mutator.apply(parts[j], program, lease)
            data = b"".join(frame(p) for p in parts)
            if rng.random() < 0.2:
                data = Mutator.apply(data, Mutator.program(rng, len(data)))  # the length prefixes too

            def case(data=data) -> tuple[str, str]:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(hang_s)
                    sock.connect("\0" + shm.socket_name(servers.node.address))
                    return _session(sock, data, hang_s)
            _timed(findings, "shm", hang_s * 2, case)
            for record in errors.take():
                findings.add("shm", "crash", record)
            continue
        body = Mutator.apply(lease if i % 2 else release, program, release)

        def parse(body=body, i=i) -> tuple[str, str]:
            try:
                (shm.parse_lease if i % 2 else shm.parse_release)(body)
            except (ValueError, struct.error) as exc:  # what the server's connection loop closes on
                return "refused", type(exc).__name__
            return "accepted", ""
        _timed(findings, "shm", hang_s, parse)
    _health(findings, "shm", servers)
    findings.seconds["shm"] = time.perf_counter() - t0


def fuzz_grpc(findings: Findings, servers: _Servers, errors: _ErrorLog, n: int, *, seed: int, hang_s: float,
              share: float) -> None:
    import grpc

    from kdn.v1 import control_pb2, data_pb2
    from kdn.wire.rpc import make_channel

    key = servers.key
    valid: dict[str, tuple[str, str, list[bytes]]] = {}  # method -> (service address, kind, sample requests)
    for module, address in ((data_pb2, servers.node.address), (control_pb2, servers.controller.address)):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request = getattr(module, method.input_type.name)()
                for name in ("keys",):
                    if name in request.DESCRIPTOR.fields_by_name:
                        getattr(request, name).extend([key, "acme/x", "globex/" + key.split("/", 1)[-1]])
                if method.input_type.name == "PutFrame":
                    request = data_pb2.PutFrame(key=key, total_size=len(servers.object), offset=0,
                                                data=servers.object)
                kind = ("stream_unary" if method.client_streaming else
                        "unary_stream" if method.server_streaming else "unary_unary")
                valid[f"/{service.full_name}/{method.name}"] = (address, kind, [request.SerializeToString()])
    channels = {addr: make_channel(addr) for addr in {a for a, _, _ in valid.values()}}
    tokens = [("authorization", f"Bearer {t}") for t in ("t-acme", "t-globex", "t-admin", "t-node", "bogus")]
    methods = sorted(valid)
    rng = random.Random(seed + 4)
    t0 = time.perf_counter()
    bad_codes = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
    try:
        for i, program in enumerate(_cases(rng, n, share, 256, seed)):
            path = methods[i % len(methods)]
            address, kind, samples = valid[path]
            data = Mutator.apply(samples[0], program, servers.object[:512])
            meta = [tokens[rng.randrange(len(tokens))]]
            call = getattr(channels[address], kind)(path)

            def case(call=call, kind=kind, data=data, meta=meta, path=path) -> tuple[str, str]:
                try:
                    if kind == "stream_unary":
                        call(iter([data, data]), timeout=hang_s, metadata=meta)
                    elif kind == "unary_stream":
                        for _ in call(data, timeout=hang_s, metadata=meta):
                            pass
                    else:
                        call(data, timeout=hang_s, metadata=meta)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        return "hang", path
                    if exc.code() == grpc.StatusCode.INTERNAL and "deserializ" in (exc.details() or ""):
                        return "refused", "malformed message (refused by gRPC before the handler)"
                    if exc.code() in bad_codes:
                        return "crash", f"{path}: {exc.code().name} {exc.details()}"
                    return "refused", exc.code().name
                return "accepted", ""
            _timed(findings, "grpc", hang_s * 2, case)
            for record in errors.take():
                findings.add("grpc", "crash", record)
            if i % 200 == 199:
                _health(findings, "grpc", servers)
    finally:
        for channel in channels.values():
            channel.close()
    _health(findings, "grpc", servers)
    findings.seconds["grpc"] = time.perf_counter() - t0


# -- the whole run -----------------------------------------------------------------------------------------------
SHARES = {"chunk": 0.25, "chunk-keyring": 0.25, "header": 0.08, "codec": 0.16, "bulk": 0.12, "shm": 0.06,
          "grpc": 0.08}
CODECS = ("raw", "lz4", "lossless", "cachegen-default")


def run_all(cases: int, *, seed: int = 0, hang_s: float = 5.0, hypothesis_share: float = 0.1,
            targets: tuple[str, ...] = tuple(SHARES)) -> Findings:
    """Fuzz every target with about ``cases`` cases in all (split by ``SHARES``)."""
    findings = Findings()
    total = sum(SHARES[t] for t in targets)

    def count(target: str) -> int:
        return max(1, int(cases * SHARES[target] / total))

    kw = dict(seed=seed, hang_s=hang_s, share=hypothesis_share)
    if "chunk" in targets:
        fuzz_chunks(findings, count("chunk"), keyring=False, **kw)
    if "chunk-keyring" in targets:
        fuzz_chunks(findings, count("chunk-keyring"), keyring=True, **kw)
    if "header" in targets:
        fuzz_header(findings, count("header"), **kw)
    if "codec" in targets:
        for name in CODECS:
            fuzz_codec(findings, name, max(1, count("codec") // len(CODECS)), **kw)
    wire = [t for t in ("bulk", "shm", "grpc") if t in targets]
    if wire:
        errors = _ErrorLog()
        logging.getLogger("kdn").addHandler(errors)
        quiet = logging.getLogger("kdn").level
        with tempfile.TemporaryDirectory(prefix="kdn-fuzz-") as root:
            servers = _Servers(root)
            logging.getLogger("kdn").setLevel(logging.ERROR)  # refusals log warnings by design; errors are findings
            try:
                for target, fn in (("bulk", fuzz_bulk), ("shm", fuzz_shm), ("grpc", fuzz_grpc)):
                    if target in wire:
                        fn(findings, servers, errors, count(target), **kw)
            finally:
                logging.getLogger("kdn").setLevel(quiet)
                logging.getLogger("kdn").removeHandler(errors)
                closer = threading.Thread(target=servers.close, name="kdn-fuzz-stop", daemon=True)
                closer.start()
                closer.join(30)
                if closer.is_alive():  # e.g. a call the fuzz left unfinished keeps the gRPC server from stopping
                    findings.add(wire[-1], "hang", "the node did not stop within 30 s after the fuzz")
    return findings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=100_000, help="cases in all (default 100,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-s", type=float, default=5.0, help="a case slower than this is a hang")
    parser.add_argument("--hypothesis-share", type=float, default=0.1,
                        help="share of each target's cases drawn by hypothesis (default 0.1)")
    parser.add_argument("--targets", default=",".join(SHARES), help=f"comma list of {', '.join(SHARES)}")


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    findings = run_all(args.cases, seed=args.seed, hang_s=args.hang_s, hypothesis_share=args.hypothesis_share,
                       targets=tuple(t for t in args.targets.split(",") if t))
    rows = []
    for target, per in findings.counts.items():
        n = sum(per.values())
        rows.append({"target": target, "cases": n, "refused": per.get("refused", 0),
                     "accepted": per.get("accepted", 0), "forgeries_accepted": per.get("accepted-forgery", 0),
                     "crash": per.get("crash", 0), "hang": per.get("hang", 0), "wrong_kv": per.get("wrong-kv", 0),
                     "seconds": findings.seconds.get(target, 0.0),
                     "cases_per_s": n / max(findings.seconds.get(target, 0.0), 1e-9)})
    from kdn.bench import format_table

    print(format_table(rows))
    print(f"{findings.total()} cases in {time.perf_counter() - t0:.1f} s: {findings.total('crash')} crashes, "
          f"{findings.total('hang')} hangs, {findings.total('wrong-kv')} wrong KV")
    for example in findings.examples:
        print("  ", example)
    return {"rows": rows, "cases": findings.total(), "crashes": findings.total("crash"),
            "hangs": findings.total("hang"), "wrong_kv": findings.total("wrong-kv"), "examples": findings.examples,
            "seconds": time.perf_counter() - t0,
            "note": "forgeries_accepted: consistent forgeries that checksums alone cannot refuse (chunk, no keyring)"}
