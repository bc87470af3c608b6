"""Processes of tests/test_shm_tenants.py: ``python -m tests.shm_tenant_proc ROLE ARGS``.

Roles: ``node`` runs ``kdn node ARGS``; ``victim`` stores KV made of a marker and reads it back through shared
memory, holding the leases until told to go; ``attacker`` (another tenant) uses every way a same-host client has to
reach the victim's bytes and reports what it found. Every role runs without capabilities. Each step prints one
JSON line on stdout; the parent answers on stdin.
"""

from __future__ import annotations

import ctypes
import glob
import json
import mmap
import os
import socket
import struct
import sys

import torch

from kdn.client import KDNClient
from kdn.format.layout import KVLayout
from kdn.wire import shm
from kdn.wire.shm import ShmClient, is_shared

LAYOUT = KVLayout("kdn-test/tiny-llama", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16")
CHUNK = 64


def marked_kv(marker: bytes, tokens: int) -> torch.Tensor:
    """KV whose bytes are ``marker`` repeated (ASCII: finite bfloat16 values)."""
    nbytes = LAYOUT.bytes_per_token * tokens
    raw = bytearray((marker * (nbytes // len(marker) + 1))[:nbytes])
    return torch.frombuffer(raw, dtype=torch.bfloat16).view(LAYOUT.shape(tokens)).clone()


def drop_capabilities() -> None:
    """Clear every capability of this process (``capset``; no-op for a plain user): the node and both tenants
    then run as a plain user would even where tests run as root (``CAP_SYS_PTRACE`` opens any process's
    descriptors, and a process without capabilities may not open those of one that has them)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    if ctypes.CDLL(None, use_errno=True).capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def wait() -> str:
    return sys.stdin.readline().strip()


def memfds() -> list[str]:
    """Every memfd this process holds, as a descriptor or a mapping (its name, e.g. ``/memfd:kdn-arena-<id>``)."""
    names = set()
    for path in glob.glob("/proc/self/fd/*"):
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if target.startswith("/memfd:"):
            names.add(target.split(" (deleted)")[0])
    names.update(name for _, _, name in _memfd_maps())
    return sorted(names)


def _memfd_maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/memfd:"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip().split(" (deleted)")[0]))
    return out


def scan_memfds(marker: bytes) -> list[str]:
    """Every byte of every memfd this process holds (mapped regions read in place, descriptors mapped in full):
    the names of those that contain ``marker``."""
    found = set()
    for lo, hi, name in _memfd_maps():
        if marker in ctypes.string_at(lo, hi - lo):
            found.add(name)
    for path in glob.glob("/proc/self/fd/*"):
        try:
            target = os.readlink(path)
            if not target.startswith("/memfd:"):
                continue
            fd = int(os.path.basename(path))
            size = os.fstat(fd).st_size
            if size and marker in mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ):
                found.add(target.split(" (deleted)")[0])
        except OSError:
            continue
    return sorted(found)


def victim(args: dict) -> None:
    marker = args["marker"].encode()
    tokens = list(range(args["tokens"]))
    kv = marked_kv(marker, len(tokens))
    with KDNClient(LAYOUT, controller=args["controller"], chunk_size=CHUNK, tenant=args["tenant"],
                   token=args["token"]) as client:
        assert client.store(tokens, kv).result(30).stored == len(tokens) // CHUNK
        stream = client.retrieve_layers(tokens)
        shared = all(is_shared(d) for _, d, _ in stream.objects)
        ranges = [(d.obj.offset, d.obj.offset + len(d)) for _, d, _ in stream.objects if is_shared(d)]
        say(step="stored", shared=shared, hit=stream.num_tokens, ranges=ranges,
            keys=[str(c.key) for c, _, _ in stream.objects], in_arena=bool(scan_memfds(marker)))
        wait()  # leases held while the attacker tries
        del stream
        assert torch.equal(client.retrieve(tokens).kv, kv)
        say(step="done")


def raw_lease(address: str, token: str, tenant: str, keys: list[str]) -> dict:
    """The protocol by hand: hello, one LEASE; what came back (hits, fds) and the node's pid."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect("\0" + shm.socket_name(address))
    node_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    shm._send(sock, shm._HELLO.pack(shm.MAGIC, shm.VERSION, len(token), len(tenant)) + token.encode()
              + tenant.encode())
    body, _ = shm._recv(sock)
    status = shm._REPLY.unpack_from(body)[2]
    encoded = [k.encode() for k in keys]
    shm._send(sock, shm._REQ.pack(shm.OP_LEASE, len(keys)) + b"".join(shm._KEY.pack(len(k)) + k for k in encoded))
    body, fds = shm._recv(sock, with_fd=True)
    items = list(shm._ITEM.iter_unpack(body[shm._TABLE.size:]))
    for fd in fds:
        os.close(fd)
    # Guessed lease ids: releasing them must not touch anyone's leases (the connection stays usable).
    shm._send(sock, shm._REQ.pack(shm.OP_RELEASE, 3) + b"".join(shm._ID.pack(i) for i in (1, 2, 99)))
    shm._send(sock, shm._REQ.pack(shm.OP_LEASE, len(keys)) + b"".join(shm._KEY.pack(len(k)) + k for k in encoded))
    again, more = shm._recv(sock, with_fd=True)
    for fd in more:
        os.close(fd)
    sock.close()
    return {"status": status, "hits": sum(1 for it in items if it[0]), "fds": len(fds) + len(more),
            "hits_again": sum(1 for it in shm._ITEM.iter_unpack(again[shm._TABLE.size:]) if it[0]),
            "node_pid": node_pid}


def oversized(address: str, token: str, tenant: str) -> list[str]:
    """Requests over the bounds (the reported 16 MiB of empty keys, a count past the limit, a count that does not
    match the body): each must close the connection instead of being served."""
    outcomes = []
    bad = [
        shm._REQ.pack(shm.OP_LEASE, ((16 << 20) - 8) // 2) + bytes((16 << 20) - 8),  # 16 MiB of empty keys
        shm._REQ.pack(shm.OP_LEASE, shm.MAX_LEASE_KEYS + 1) + (shm._KEY.pack(1) + b"x") * (shm.MAX_LEASE_KEYS + 1),
        shm._REQ.pack(shm.OP_LEASE, 1000) + shm._KEY.pack(0) * 1000,  # empty keys within the size bound
        shm._REQ.pack(shm.OP_LEASE, 5) + shm._KEY.pack(3) + b"abc",  # fewer keys than counted
        shm._REQ.pack(shm.OP_RELEASE, 1 << 20) + bytes(8),
    ]
    for body in bad:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect("\0" + shm.socket_name(address))
        shm._send(sock, shm._HELLO.pack(shm.MAGIC, shm.VERSION, len(token), len(tenant)) + token.encode()
                  + tenant.encode())
        shm._recv(sock)
        try:
            sock.sendall(shm._LEN.pack(len(body)) + body)
            outcomes.append("closed" if sock.recv(1 << 16) == b"" else "answered")
        except (ConnectionResetError, BrokenPipeError):
            outcomes.append("closed")
        sock.close()
    return outcomes


def attacker(args: dict) -> None:
    victim_marker = args["victim_marker"].encode()
    own_marker = args["marker"].encode()
    victim_keys = args["victim_keys"]
    address = args["node"]
    with KDNClient(LAYOUT, controller=args["controller"], chunk_size=CHUNK, tenant=args["tenant"],
                   token=args["token"]) as client:
        tokens = list(range(10_000, 10_000 + args["tokens"]))
        client.store(tokens, marked_kv(own_marker, len(tokens))).result(30)
        stream = client.retrieve_layers(tokens)
        own_shared = stream.num_tokens == len(tokens) and all(is_shared(d) for _, d, _ in stream.objects)
        del stream
        # 1. The victim's keys through the client API, with our token, claiming either tenant.
        asked = {}
        for tenant in (args["tenant"], args["victim_tenant"]):
            spy = ShmClient(address, token=args["token"], tenant=tenant)
            asked[tenant] = sum(v is not None for v in spy.get_many(victim_keys))
            spy.close()
        # 2. The protocol by hand (the same keys; guessed releases), and the node's own descriptors.
        raw = raw_lease(address, args["token"], args["victim_tenant"], victim_keys)
        try:
            node_fds = os.listdir(f"/proc/{raw['node_pid']}/fd")
            opened = 0
            for name in node_fds:
                try:
                    os.close(os.open(f"/proc/{raw['node_pid']}/fd/{name}", os.O_RDONLY))
                    opened += 1
                except OSError:
                    pass
            node_fd_access = f"opened {opened} of {len(node_fds)}"
        except PermissionError:
            node_fd_access = "opened 0 of ?"  # not even listed
        # 3. Every byte of every arena this process holds, at every offset.
        say(step="probed", own_shared=own_shared, asked=asked, raw=raw, node_fd_access=node_fd_access,
            memfds=memfds(), victim_bytes_in=scan_memfds(victim_marker),
            own_bytes_in=bool(scan_memfds(own_marker)), oversized=oversized(address, args["token"], args["tenant"]))
        wait()  # the victim has released its leases and gone: now take its space over
        rounds = args["fill_rounds"]
        held = []
        for r in range(rounds):
            more = list(range(100_000 * (r + 2), 100_000 * (r + 2) + args["tokens"]))
            client.store(more, marked_kv(own_marker, len(more))).result(30)
            stream = client.retrieve_layers(more)
            held.extend((d.obj.offset, d.obj.offset + len(d)) for _, d, _ in stream.objects if is_shared(d))
            del stream
        say(step="filled", ranges=held, memfds=memfds(), victim_bytes_in=scan_memfds(victim_marker))


def node(argv: list[str]) -> int:
    """``kdn node ARGV`` without capabilities (as every process of this test: what a plain user can do)."""
    from kdn.cli.main import main

    drop_capabilities()
    sys.argv = ["kdn", "node", *argv]
    return main()


if __name__ == "__main__":
    if sys.argv[1] == "node":
        sys.exit(node(sys.argv[2:]))
    drop_capabilities()
    {"victim": victim, "attacker": attacker}[sys.argv[1]](json.loads(sys.argv[2]))
