"""Transfer throughput: put/get of chunk objects over a raw socket, the bulk channel and a node's gRPC plane.

Every path runs against a server in its own process (spawned, so it shares no GIL with the client):

- ``raw``: a plain ``sendall``/``recv_into`` server; the receiver reuses one buffer (the ceiling every ratio is
  measured against);
- ``raw-fresh``: the same, but the receiver allocates a new buffer per object, as any API that hands objects
  out must (first-touch page faults are part of its cost);
- ``bulk-bare``: `BulkServer` with a dict handler that keeps the received buffers (the channel
  alone, no node); ``bulk-tls`` the same over TLS (certificates made as ``kdnctl gen-secrets`` does): TLS's cost is
  its ratio to ``bulk-bare``;
- ``bulk`` (TCP only), ``shm`` (the same node read in place through same-host shared memory) and ``grpc``: a
  real standalone storage node (memory tier) through :class:`kdn.client.transport.NodeClient`, storing real chunk
  objects that the node verifies; ``bulk`` gets land in a :class:`kdn.wire.recv_pool.ReceivePool`, as the
  client's fetches do.

Ops are interleaved across paths (put, then get), one object per call; GB/s is the object size over the p50.

``--prefix-mib N`` adds the delivery rows: a whole cached prefix of N MiB (256-token chunks of a Llama-3-8B
shaped KV, 32 MiB each) retrieved by :class:`kdn.client.KDNClient` from a ``kdn serve`` child over TCP only,
verified and decoded into ``--device`` memory, with 1 and ``--streams`` bulk connections: ``kdn-prefix`` whole
objects (``retrieve``), ``kdn-layers-prefix`` layer-major (``retrieve_layers(layer_major=True)``, each layer group
decoded as it arrives); against the same run's raw-socket ceiling: 1 and ``--streams`` plain sockets each
``recv_into`` its slice of one reused (on CUDA: pinned) host buffer.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

MiB = 1 << 20
_RAW_REQ = struct.Struct("<BBQ")  # op (1 get, 2 put), fresh buffer (0/1), size
_RAW_GET, _RAW_PUT = 1, 2
_PATHS = ("raw", "raw-fresh", "bulk-bare", "bulk-tls", "bulk", "shm", "grpc")
_COLUMNS = ["size_mib", "path", "op", "gbps", "p50_ms", "ratio"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,4,16,64", help="object sizes in MiB, comma-separated (default 1,4,16,64)")
    parser.add_argument("--repeat", type=int, default=5, help="timed ops per size, path and op (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed ops first (default 1)")
    parser.add_argument("--paths", default=",".join(_PATHS), help=f"paths to measure (default {','.join(_PATHS)})")
    parser.add_argument("--prefix-mib", type=int, default=0,
                        help="also retrieve a whole prefix of this many MiB through KDNClient (e.g. 1024)")
    parser.add_argument("--streams", type=int, default=8, help="parallel streams of the prefix rows (default 8)")
    parser.add_argument("--device", default="cpu", help="where the prefix rows decode to: cpu or cuda")


# -- servers, each in its own process -----------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        got = sock.recv_into(view[pos:])
        if not got:
            raise ConnectionError("peer closed")
        pos += got


def _raw_serve_conn(sock: socket.socket) -> None:
    payloads: dict[int, bytes] = {}
    scratch = bytearray()
    head = bytearray(_RAW_REQ.size)
    with sock:
        while True:
            try:
                _recv_exact(sock, memoryview(head))
            except (ConnectionError, OSError):
                return
            op, fresh, size = _RAW_REQ.unpack(head)
            if op == _RAW_GET:
                if size not in payloads:
                    payloads[size] = os.urandom(size)
                sock.sendall(memoryview(payloads[size]))
            else:
                if fresh:
                    buf = bytearray(size)
                else:
                    if len(scratch) < size:
                        scratch = bytearray(size)
                    buf = scratch
                _recv_exact(sock, memoryview(buf)[:size])
                sock.sendall(b"\x01")
                del buf


def _raw_server(pipe: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    pipe.send(listener.getsockname()[1])
    listener.settimeout(0.2)
    while not pipe.poll():
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_raw_serve_conn, args=(sock,), daemon=True).start()


class _DictHandler:
    """The bare channel's handler: keeps each received bytearray as it is (no verification, no copy)."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def authenticate(self, token: str, tenant: str) -> str:
        return tenant

    def get_many(self, principal: str, keys: list[str]) -> list[Any]:
        return [self.objects.get(k) for k in keys]

    def put_many(self, principal: str, items: list[tuple[str, Any]]) -> list[tuple[bool, str]]:
        self.objects.update(items)
        return [(True, "")] * len(items)


def _bulk_server(pipe: Any, max_object: int, tls_dir: str = "") -> None:
    from kdn.wire.bulk_server import BulkServer
    from kdn.wire.rpc import ssl_context

    server = BulkServer("127.0.0.1", 0, _DictHandler(), max_object_bytes=max_object,
                        ssl_context=ssl_context(_tls_config(tls_dir), server=True) if tls_dir else None)
    try:
        pipe.send(server.start())
        pipe.recv()
    except (EOFError, OSError):
        pass
    finally:
        server.stop(0)


def _node_server(pipe: Any, capacity: int, max_object: int) -> None:
    from kdn.config import KDNConfig, TierSpec
    from kdn.node.servicer import StorageNode

    with tempfile.TemporaryDirectory(prefix="kdn-bench-") as data_dir:
        config = KDNConfig(data_dir=data_dir, metrics_port=-1)
        config.node.controller = ""
        config.node.port = 0
        config.node.bulk_port = 0
        config.node.max_object_bytes = max_object
        config.node.tiers = [TierSpec.parse({"kind": "memory", "capacity": capacity})]
        node = StorageNode(config).start()
        try:
            pipe.send((node.grpc_port, node.bulk_port))
            pipe.recv()  # until the parent says stop (or goes away)
        except (EOFError, OSError):
            pass
        finally:
            node.stop(0.5)


class _Child:
    """A spawned server process that reports its port(s) through a pipe."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_end, *args), daemon=True)
        self.proc.start()
        if not self.pipe.poll(60):
            self.close()
            raise RuntimeError(f"benchmark server {target.__name__} did not start")
        self.ports = self.pipe.recv()

    def close(self) -> None:
        try:
            self.pipe.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# -- clients --------------------------------------------------------------------------------------------------------
class _RawClient:
    def __init__(self, port: int, fresh: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fresh = fresh
        self.scratch = bytearray()

    def put(self, key: str, obj: bytes) -> None:
        self.sock.sendall(_RAW_REQ.pack(_RAW_PUT, self.fresh, len(obj)))
        self.sock.sendall(memoryview(obj))
        _recv_exact(self.sock, memoryview(bytearray(1)))

    def get(self, key: str, size: int) -> None:
        self.sock.sendall(_RAW_REQ.pack(_RAW_GET, self.fresh, size))
        if self.fresh:
            buf = bytearray(size)
        else:
            if len(self.scratch) < size:
                self.scratch = bytearray(size)
            buf = self.scratch
        _recv_exact(self.sock, memoryview(buf)[:size])

    def close(self) -> None:
        self.sock.close()


def _tls_config(tls_dir: str):
    """The TLS files ``kdnctl gen-secrets`` writes into ``tls_dir`` (one certificate for both ends)."""
    from kdn.config import TLSConfig

    root = Path(tls_dir)
    return TLSConfig(cert=str(root / "kdn.crt"), key=str(root / "kdn.key"), ca=str(root / "ca.crt"))


class _BulkPath:
    def __init__(self, port: int, tls_dir: str = "") -> None:
        from kdn.wire.bulk_client import BulkClient
        from kdn.wire.rpc import ssl_context

        context = ssl_context(_tls_config(tls_dir), server=False) if tls_dir else None
        self.client = BulkClient(f"127.0.0.1:{port}", tenant="default", timeout_s=60.0, ssl_context=context)

    def put(self, key: str, obj: bytes) -> None:
        if self.client.put_many([(key, obj)]) != [(True, "")]:
            raise RuntimeError(f"bulk server refused the object {key}")

    def get(self, key: str, size: int) -> None:
        (got,) = self.client.get_many([key])
        if got is None or len(got) != size:
            raise RuntimeError(f"bulk server returned {None if got is None else len(got)} bytes for {key}")

    def close(self) -> None:
        self.client.close()


class _NodePath:
    def __init__(self, grpc_port: int, bulk_port: int, path: str) -> None:
        from kdn.client.transport import NodeClient
        from kdn.wire.recv_pool import ReceivePool

        bulk = f"127.0.0.1:{bulk_port}" if bulk_port > 0 else ""
        self.client = NodeClient(f"127.0.0.1:{grpc_port}", bulk, tenant="default", timeout_s=60.0,
                                 transport="grpc" if path == "grpc" else "bulk", shared_memory=path == "shm")
        self.pool = ReceivePool(256 * MiB) if path == "bulk" else None
        self.shm = path == "shm"

    def put(self, key: str, obj: bytes) -> None:
        if self.client.put_many([(key, obj)]) != [True]:
            raise RuntimeError(f"node refused the object {key}")

    def get(self, key: str, size: int) -> None:
        leases: list = []

        def alloc(n: int):
            leases.append(self.pool.lease(n))
            return leases[-1].view

        (got,) = self.client.get_many([key], alloc=alloc if self.pool is not None else None)
        if got is None or len(got) != size:
            raise RuntimeError(f"node returned {None if got is None else len(got)} bytes for {key}")
        if self.shm and not _is_shared(got):
            raise RuntimeError("the shm path did not read through shared memory")
        for lease in leases:
            self.pool.release(lease)

    def close(self) -> None:
        self.client.close()


def _is_shared(data: Any) -> bool:
    from kdn.wire.shm import is_shared

    return is_shared(data)


# -- objects --------------------------------------------------------------------------------------------------------
class _Objects:
    """Real chunk objects of an exact total size, each under its own prefix key."""

    def __init__(self) -> None:
        self.fingerprint = os.urandom(16)
        self.counter = 0

    def key(self) -> str:
        from kdn.format.keys import prefix_keys

        self.counter += 1
        tokens = list(range(self.counter * 256, self.counter * 256 + 256))
        (_, key), = prefix_keys(tokens, "default", self.fingerprint, "raw", 256)
        return str(key)

    def build(self, key: str, size: int, payload: bytes | None = None) -> bytes:
        from kdn.format.chunk import build_object

        header = len(build_object(codec="raw", key=key, fingerprint=self.fingerprint, num_tokens=256, start=0,
                                  num_layers=1, sections=[(0, 1, b"")]))
        if size < header:
            raise ValueError(f"size {size} is smaller than a chunk header ({header} bytes)")
        body = payload[:size - header] if payload is not None else os.urandom(size - header)
        return build_object(codec="raw", key=key, fingerprint=self.fingerprint, num_tokens=256, start=0,
                            num_layers=1, sections=[(0, 1, body)])


# -- the benchmark --------------------------------------------------------------------------------------------------
def _hardware() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        import grpc

        info["grpcio"] = grpc.__version__
    except ImportError:
        pass
    return info


def run(args: argparse.Namespace) -> dict:
    sizes = [int(float(s) * MiB) for s in str(args.sizes).split(",") if s.strip()]
    paths = [p.strip() for p in str(args.paths).split(",") if p.strip()]
    unknown = set(paths) - set(_PATHS)
    if unknown or not sizes or args.repeat < 1:
        raise SystemExit(f"bad --paths {sorted(unknown)} / --sizes / --repeat; paths are {', '.join(_PATHS)}")
    if "raw" not in paths:
        paths.insert(0, "raw")  # every ratio is against it
    ops = args.warmup + args.repeat
    node_paths = [p for p in paths if p in ("bulk", "shm", "grpc")]
    children: list[_Child] = []
    clients: dict[str, Any] = {}
    timings: dict[tuple[int, str, str], list[float]] = {}
    try:
        raw = _Child(_raw_server)
        children.append(raw)
        clients["raw"] = _RawClient(raw.ports, fresh=False)
        if "raw-fresh" in paths:
            clients["raw-fresh"] = _RawClient(raw.ports, fresh=True)
        if "bulk-bare" in paths:
            bare = _Child(_bulk_server, max(sizes) + MiB)
            children.append(bare)
            clients["bulk-bare"] = _BulkPath(bare.ports)
        if "bulk-tls" in paths and importlib.util.find_spec("cryptography") is None:
            print("note: bulk-tls skipped: `cryptography` is not installed (pip install 'kdn[test]')")
            paths = [p for p in paths if p != "bulk-tls"]
        if "bulk-tls" in paths:
            from kdn.wire.certs import make_pki

            tls_dir = tempfile.mkdtemp(prefix="kdn-bench-tls-")  # needs `cryptography` (the test extra)
            names = {"ca": "ca.crt", "ca_key": "ca.key", "cert": "kdn.crt", "key": "kdn.key"}
            for what, pem in make_pki(["127.0.0.1", "localhost"], 1).items():
                (Path(tls_dir) / names[what]).write_bytes(pem)
            tls = _Child(_bulk_server, max(sizes) + MiB, tls_dir)
            children.append(tls)
            clients["bulk-tls"] = _BulkPath(tls.ports, tls_dir)
        if node_paths:
            capacity = len(node_paths) * ops * sum(sizes) + 64 * MiB
            node = _Child(_node_server, capacity, max(sizes) + MiB)
            children.append(node)
            grpc_port, bulk_port = node.ports
            if {"bulk", "shm"} & set(node_paths) and bulk_port <= 0:
                raise RuntimeError("the node has no bulk channel")
            for path in node_paths:
                clients[path] = _NodePath(grpc_port, bulk_port, path)
        objects = _Objects()
        for size in sizes:
            payload = os.urandom(size)
            keys = {p: [objects.key() for _ in range(ops)] for p in paths}
            for op in ("put", "get"):
                for i in range(ops):
                    for path in paths:
                        key = keys[path][i]
                        obj = objects.build(key, size, payload) if op == "put" else None
                        start = time.perf_counter()
                        if obj is not None:
                            clients[path].put(key, obj)
                        else:
                            clients[path].get(key, size)
                        elapsed = time.perf_counter() - start
                        if i >= args.warmup:
                            timings.setdefault((size, path, op), []).append(elapsed)
                        del obj
    finally:
        for client in clients.values():
            client.close()
        for child in children:
            child.close()
    rows = []
    for (size, path, op), ts in timings.items():
        p50 = statistics.median(ts)
        rows.append({"size_mib": size / MiB, "path": path, "op": op, "gbps": size / p50 / 1e9,
                     "p50_ms": p50 * 1e3, "n": len(ts)})
    base = {(r["size_mib"], r["op"]): r["gbps"] for r in rows if r["path"] == "raw"}
    for row in rows:
        row["ratio"] = row["gbps"] / base[(row["size_mib"], row["op"])]
    rows.sort(key=lambda r: (r["size_mib"], r["op"] != "put", paths.index(r["path"])))
    from kdn.bench import format_table

    print(f"transfer over 127.0.0.1, one object per call, p50 of {args.repeat} "
          f"(ratio: vs raw socket into a reused buffer)")
    print(format_table(rows, _COLUMNS))
    if args.prefix_mib > 0:
        prefix = _prefix_rows(args)
        print(f"\nwhole prefix of {args.prefix_mib} MiB, node over TCP only, p50 of {args.repeat} "
              f"(ratio: vs the raw sockets with as many streams)")
        print(format_table(prefix, _PREFIX_COLUMNS))
        rows += prefix
    return {"rows": rows, "hardware": _hardware(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": {"sizes_mib": [s / MiB for s in sizes], "repeat": args.repeat, "warmup": args.warmup,
                         "paths": paths}}


# -- whole-prefix delivery ------------------------------------------------------------------------------------------
_PREFIX_COLUMNS = ["path", "streams", "device", "mib", "gbps", "p50_ms", "ratio"]


def _raw_striped(port: int, streams: int, total: int, pinned: bool, repeat: int, warmup: int) -> list[float]:
    """Seconds per fetch of ``total`` bytes over ``streams`` raw sockets, each into its slice of one buffer."""
    import numpy as np

    if pinned:
        import torch

        dest = torch.empty(total, dtype=torch.uint8, pin_memory=True).numpy()
    else:
        dest = np.empty(total, dtype=np.uint8)
    dest.fill(0)
    view = memoryview(dest)
    clients = [_RawClient(port, fresh=False) for _ in range(streams)]
    per = -(-total // streams)
    slices = [view[i * per:min(total, (i + 1) * per)] for i in range(streams)]

    def one(client: _RawClient, part: memoryview) -> None:
        client.sock.sendall(_RAW_REQ.pack(_RAW_GET, 0, len(part)))
        _recv_exact(client.sock, part)

    times = []
    try:
        for i in range(warmup + repeat):
            threads = [threading.Thread(target=one, args=(c, sl)) for c, sl in zip(clients, slices)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        for c in clients:
            c.close()
    return times


def _whole(client: Any, tokens: list[int], device: str) -> int:
    """``retrieve``: every object fetched and verified, then decoded into one tensor on ``device``."""
    return client.retrieve(tokens, device=device).num_tokens


def _layer_major(client: Any, tokens: list[int], device: str) -> int:
    """``retrieve_layers(layer_major=True)``: each layer group decoded into ``device`` memory as it arrives."""
    stream = client.retrieve_layers(tokens, device=device, layer_major=True)
    try:
        out = stream.empty()
        for start, end in stream.groups():
            stream.decode_group(start, end, out=out[start:end])
        return stream.num_tokens
    finally:
        stream.close()


def _prefix_rows(args: argparse.Namespace) -> list[dict]:
    """A whole prefix through KDNClient over TCP (1 and ``--streams`` streams; whole objects and layer-major) vs
    raw sockets."""
    import torch

    from kdn.bench.ttft import _Server
    from kdn.format.layout import KVLayout

    device = str(args.device)
    cuda = device.startswith("cuda")
    layout = KVLayout(model_id="bench-transfer-llama3-8b", num_layers=32, num_kv_heads=8, head_dim=128,
                      dtype="bfloat16")
    chunk = 256
    chunks = max(1, args.prefix_mib * MiB // (layout.bytes_per_token * chunk))
    tokens = list(range(7, 7 + chunks * chunk))
    total = chunks * chunk * layout.bytes_per_token
    kv = torch.randn(layout.shape(len(tokens)), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    results: list[tuple[str, int, list[float], int]] = []
    raw = _Child(_raw_server)
    with tempfile.TemporaryDirectory(prefix="kdn-bench-prefix-") as work:
        capacity = f"{int(total * 1.3) // MiB + 64}MiB"
        server = _Server(__import__("pathlib").Path(work), f"[{{kind: memory, capacity: {capacity}}}]")
        try:
            with server.client(layout, "raw", chunk, shared_memory=False, store_partial=False) as client:
                stored = client.store(tokens, kv, copy=False).result(600)
                if stored.stored + stored.skipped != chunks:
                    raise RuntimeError(f"storing the prefix failed: {stored}")
            del kv
            for streams in sorted({1, max(1, args.streams)}):
                results.append(("raw", streams, _raw_striped(raw.ports, streams, total, cuda, args.repeat,
                                                             args.warmup), total))
                with server.client(layout, "raw", chunk, shared_memory=False, bulk_streams=streams,
                                   fetch_workers=streams, receive_pool_bytes=total + 64 * MiB) as client:
                    for path, fetch in (("kdn", _whole), ("kdn-layers", _layer_major)):
                        times = []
                        for i in range(args.warmup + args.repeat):
                            if cuda:
                                torch.cuda.synchronize()
                            t0 = time.perf_counter()
                            got = fetch(client, tokens, device)
                            if cuda:
                                torch.cuda.synchronize()
                            elapsed = time.perf_counter() - t0
                            if got != len(tokens):
                                raise RuntimeError(f"{path}: retrieved {got} of {len(tokens)} tokens")
                            if i >= args.warmup:
                                times.append(elapsed)
                        results.append((path, streams, times, total))
        finally:
            server.close()
            raw.close()
    rows = []
    base = {}
    for path, streams, times, nbytes in results:
        p50 = statistics.median(times)
        gbps = nbytes / p50 / 1e9
        if path == "raw":
            base[streams] = gbps
        rows.append({"path": f"{path}-prefix", "streams": streams, "device": "host" if path == "raw" else device,
                     "mib": nbytes / MiB, "gbps": gbps, "p50_ms": 1e3 * p50, "ratio": gbps / base[streams],
                     "op": "get", "size_mib": nbytes / MiB})
    return rows
