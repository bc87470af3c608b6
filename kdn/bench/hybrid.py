"""Layer-type-aware storage: bytes a hybrid model's prefix takes in KDN, against a store of every layer.

For each ``--tokens`` length, random KV of that many tokens in Gemma 3 270M's layout (18 layers, every sixth one
full attention, the others sliding with window 512; 1 KV head of dim 256; bf16) is stored on a real storage node
(``kdn serve`` in a child process, memory tier) twice, under fresh prompts: by a plain
:class:`~kdn.client.KDNClient` (every layer of every chunk: the baseline) and by a
:class:`~kdn.client.hybrid.HybridClient` (full layers per chunk, one window object at the last boundary). The
node's own byte account (``used_bytes`` of its tiers, before and after) gives ``full_MiB`` and ``hybrid_MiB``;
``ratio`` is hybrid over full from the same run, ``arithmetic`` the payload-only expectation
``(F*n + S*W) / (L*n)``. Each hybrid prefix is read back (``same_kv``: full layers and windows bit-exact) and
``fetch_ratio`` compares the bytes a hit moves. Goal: ``ratio`` <= 0.25 at 8K tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kdn.bench import format_table

__all__ = ["add_arguments", "run", "gemma3_270m_layout"]

MiB = 1 << 20
COLUMNS = ["tokens", "full_MiB", "hybrid_MiB", "ratio", "arithmetic", "fetch_ratio", "windows", "same_kv",
           "full_store_s", "hybrid_store_s", "goal"]
GOAL = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1024,2048,4096,8192", help="prompt lengths (default 1024,...,8192)")
    parser.add_argument("--window", type=int, default=512, help="sliding window W (default 512, Gemma 3's)")
    parser.add_argument("--layers", type=int, default=18, help="layers (default 18)")
    parser.add_argument("--full-every", type=int, default=6, help="every Nth layer is full attention (default 6)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--codec", default="raw")
    parser.add_argument("--node-memory", default="4GiB", help="the node's memory tier (default 4GiB)")


def gemma3_270m_layout(window: int = 512, layers: int = 18, full_every: int = 6):
    """Gemma 3 270M's KV layout (``../shared/models.md``), without loading the model."""
    from kdn.format.layout import KVLayout

    types = tuple("full_attention" if i % full_every == full_every - 1 else "sliding_attention"
                  for i in range(layers))
    return KVLayout("google/gemma-3-270m@kdn-bench-shape", layers, 1, 256, dtype="bfloat16", rope_theta=1e6,
                    layer_types=types, sliding_window=window)


def _used(nodes) -> int:
    from kdn.client.transport import NodeClient

    total = 0
    for node in nodes:
        with NodeClient(node.address) as nc:
            total += sum(t.used_bytes for t in nc.stats().node.tiers)
    return total


def run(args) -> dict:
    import torch

    from kdn.bench.ttft import _Server
    from kdn.client.hybrid import HybridClient

    layout = gemma3_270m_layout(args.window, args.layers, args.full_every)
    full_n, sliding_n = len(layout.layers_of("full")), len(layout.layers_of("sliding"))
    lengths = [int(x) for x in str(args.tokens).split(",") if x]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdn-bench-hybrid-") as work:
        server = _Server(Path(work) / "node", f"[{{kind: memory, capacity: {args.node_memory}}}]")
        try:
            opts = {"chunk_size": args.chunk_size, "codec": args.codec}
            plain = server.client(layout, **opts)
            hybrid = HybridClient(layout, controller=server.address, timeout_s=300.0, **opts)
            nodes = hybrid.refresh_nodes()
            try:
                for i, n in enumerate(lengths):
                    gen = torch.Generator().manual_seed(i)
                    kv = torch.randn(layout.shape(n), generator=gen).to(torch.bfloat16)
                    toks = torch.randint(10, 1 << 20, (2, n), generator=gen).tolist()
                    t0, before = time.perf_counter(), _used(nodes)
                    assert plain.store(toks[0], kv).result(600).failed == 0
                    full_s, full_b = time.perf_counter() - t0, _used(nodes) - before
                    t0, before = time.perf_counter(), _used(nodes)
                    res = hybrid.store(toks[1], kv).result(600)
                    hyb_s, hyb_b = time.perf_counter() - t0, _used(nodes) - before
                    got_full = plain.retrieve(toks[0])
                    stream = hybrid.retrieve_layers(toks[1])
                    try:
                        hit = stream.num_tokens
                        got = stream.decode_group(0, layout.num_layers) if hit else None
                        fetched = stream.bytes
                    finally:
                        stream.close()
                    same = bool(hit) and _same(got, kv[:, :, :hit], hybrid, args.window)
                    ratio = hyb_b / full_b if full_b else float("nan")
                    w = min(args.window, hit or n)
                    rows.append({
                        "tokens": n, "full_MiB": full_b / MiB, "hybrid_MiB": hyb_b / MiB, "ratio": ratio,
                        "arithmetic": (full_n * n + sliding_n * w) / (layout.num_layers * n),
                        "fetch_ratio": fetched / got_full.bytes if got_full.bytes else float("nan"),
                        "windows": res.windows, "same_kv": same, "full_store_s": full_s, "hybrid_store_s": hyb_s,
                        "goal": ("met" if ratio <= GOAL else "not met") if n >= 8192 else "",
                    })
                    del kv, got, got_full
            finally:
                hybrid.close()
                plain.close()
        finally:
            server.close()
    print(format_table(rows, COLUMNS))
    return {"rows": rows, "layout": layout.to_dict(), "goal": f"ratio <= {GOAL} at 8192 tokens"}


def _same(got, want, hybrid, window: int) -> bool:
    """Full layers identical; sliding layers identical over the window before the boundary."""
    import torch

    n = want.shape[2]
    full, sliding = list(hybrid.full_index), list(hybrid.sliding_index)
    w = min(window, n)
    return (torch.equal(got[full], want[full]) and torch.equal(got[sliding][:, :, n - w:], want[sliding][:, :, n - w:])
            and not got[sliding][:, :, :n - w].any())
