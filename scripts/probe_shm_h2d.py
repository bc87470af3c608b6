"""Host-to-GPU copy speed from a CUDA-registered memfd mapping (as kdn.wire.shm reads it) vs pinned memory, and the
time of each step of loading an 8K-token Llama-3-8B-shaped prefix (1 GiB) from a node's shared memory.

Prints GB/s for 1 GiB moved in 4 MiB and 1 MiB copies: from pinned memory, from the registered mapping at
page-aligned offsets and shifted by 1,000 bytes (a chunk header's worth); then, per load path (``ideal``: one
pinned copy; ``host``: HostKVCache; ``node``: kdn.wire.shm from a ``kdn serve`` child), retrieve, issue and copy times.
Usage: python scripts/probe_shm_h2d.py
"""

from __future__ import annotations

import mmap
import os
import statistics

import numpy as np
import torch

from kdn.wire.buffers import host_tensor

SIZE, COPY = 1 << 30, 4 << 20


def rate(src: torch.Tensor, shift: int, copy: int = COPY) -> float:
    dst = torch.empty(copy, dtype=torch.uint8, device="cuda")
    n = (SIZE - copy) // copy
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n):
            dst.copy_(src[i * copy + shift:(i + 1) * copy + shift], non_blocking=True)
        end.record()
        end.synchronize()
    return n * copy / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    fd = os.memfd_create("probe")
    os.ftruncate(fd, SIZE)
    rw = mmap.mmap(fd, SIZE)
    rw[:] = os.urandom(1 << 20) * (SIZE >> 20)
    rw.close()
    ro = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
    mapped = host_tensor(memoryview(np.frombuffer(ro, dtype=np.uint8)))
    err = torch.cuda.cudart().cudaHostRegister(mapped.data_ptr(), SIZE, 8)
    pinned = torch.empty(SIZE, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(mapped)
    print(f"register (read-only): {err}")
    for copy in (COPY, 1 << 20):
        print(f"{copy >> 20} MiB copies: pinned {rate(pinned, 0, copy):.1f} GB/s; registered memfd aligned "
              f"{rate(mapped, 0, copy):.1f}; +1000 B {rate(mapped, 1000, copy):.1f}; pinned +1000 B "
              f"{rate(pinned, 1000, copy):.1f}")
    from kdn.client.same_host import _memcpy2d

    fn = _memcpy2d()
    rows, pitch = 120, (8 << 20) + 4096
    dst = torch.empty((rows, COPY), dtype=torch.uint8, device="cuda")
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        rc = fn(dst.data_ptr(), COPY, mapped.data_ptr(), pitch, COPY, rows, 1, torch.cuda.current_stream().cuda_stream)
        end.record()
        end.synchronize()
    print(f"cudaMemcpy2DAsync {rows} x 4 MiB rows (rc {rc}): {rows * COPY / (start.elapsed_time(end) / 1e3) / 1e9:.1f}"
          f" GB/s; bytes right: {torch.equal(dst[7].cpu(), mapped[7 * pitch:7 * pitch + COPY])}")


def load_probe(tokens: int = 8192, device: str = "cuda") -> None:
    import tempfile
    import time
    from pathlib import Path

    from connectors.hf import HostKVCache
    from connectors.hf.loader import LayerLoader
    from kdn.bench.ttft import _Server
    from kdn.client.same_host import fast_source
    from kdn.format.layout import KVLayout

    layout = KVLayout("probe/llama3-8b", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    ids = list(range(tokens))
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kv = torch.randn(layout.shape(tokens), dtype=torch.bfloat16)
    kv = kv.pin_memory() if cuda else kv
    server = _Server(Path(tempfile.mkdtemp()) / "node", "[{kind: memory, capacity: 2GiB}]")
    client = server.client(layout, "raw", 256)
    host = HostKVCache(layout, capacity_bytes=2 << 30)
    try:
        client.store(ids, kv).result(120)
        host.store(ids, kv)
        for name in ("ideal", "host", "node"):
            times = []
            for _ in range(4):
                sync()
                t0 = time.perf_counter()
                if name == "ideal":
                    kv.to(device, non_blocking=True) if cuda else kv.clone()
                    t1 = t2 = time.perf_counter()
                else:
                    src = host.retrieve_layers(ids) if name == "host" else fast_source(client.retrieve_layers(ids),
                                                                                      device)
                    t1 = time.perf_counter()
                    loader = LayerLoader(src, layout, device=device).start()
                    t2 = time.perf_counter()
                    if not cuda:
                        for layer in range(layout.num_layers):
                            loader.fetch(layer)
                sync()
                t3 = time.perf_counter()
                if name != "ideal":
                    loader.close()
                    del src, loader
                times.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
            r, i, c, t = (1e3 * statistics.median(x) for x in zip(*times[1:]))
            print(f"{name}: retrieve {r:.1f} ms, issue {i:.1f} ms, copies after issue {c:.1f} ms, total {t:.1f} ms "
                  f"({kv.numel() * 2 / (t / 1e3) / 1e9:.1f} GB/s)")
    finally:
        client.close()
        server.close()


if __name__ == "__main__":
    main()
    load_probe()
