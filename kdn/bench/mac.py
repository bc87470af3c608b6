"""The cost of forgery-proof objects: keyed BLAKE3 vs the xxh3 checksums (baseline), and signed vs unsigned objects.

Rows: hash throughput on one ``--section-mib`` buffer (xxh3, keyed BLAKE3 on one thread and with BLAKE3's thread
pool), and ``build_object`` / ``verify_object`` of a ``--layers``-section object without and with a keyring.
Best of ``--repeat`` rounds; ratios are to the unkeyed baseline of the same run. docs/security.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import blake3
import xxhash

from kdn.bench import format_table
from kdn.format.chunk import build_object, verify_object
from kdn.format.mac import Keyring

__all__ = ["add_arguments", "run"]

MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--section-mib", type=float, default=32.0, help="buffer hashed in the hash rows (32 MiB)")
    parser.add_argument("--layers", type=int, default=32, help="sections of the object rows (default 32)")
    parser.add_argument("--layer-mib", type=float, default=1.0, help="bytes per section (default 1 MiB)")
    parser.add_argument("--repeat", type=int, default=5)


def _gbps(fn: Callable[[], object], nbytes: int, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def run(args: argparse.Namespace) -> dict:
    ring = Keyring({"bench": os.urandom(32).hex()})
    key = os.urandom(32)
    buf = os.urandom(int(args.section_mib * MiB))
    rows = []
    base = _gbps(lambda: xxhash.xxh3_64_intdigest(buf), len(buf), args.repeat)
    for name, fn in (("xxh3-64", lambda: xxhash.xxh3_64_intdigest(buf)),
                     ("blake3-keyed-1t", lambda: blake3.blake3(buf, key=key).digest()),
                     ("blake3-keyed-auto", lambda: blake3.blake3(buf, key=key, max_threads=blake3.blake3.AUTO)
                      .digest())):
        rate = _gbps(fn, len(buf), args.repeat)
        rows.append({"op": name, "bytes_mib": len(buf) / MiB, "gbps": rate, "vs_baseline": rate / base})
    sections = [(i, i + 1, os.urandom(int(args.layer_mib * MiB))) for i in range(args.layers)]
    fields = dict(codec="raw", key="bench/x", fingerprint=bytes(16), num_tokens=256, start=0,
                  num_layers=args.layers, sections=sections)
    plain, signed = build_object(**fields), build_object(**fields, keyring=ring)
    for op, fn_plain, fn_signed in (
            ("build_object", lambda: build_object(**fields), lambda: build_object(**fields, keyring=ring)),
            ("verify_object", lambda: verify_object(plain), lambda: verify_object(signed, keyring=ring))):
        base = _gbps(fn_plain, len(plain), args.repeat)
        rows.append({"op": f"{op} unsigned", "bytes_mib": len(plain) / MiB, "gbps": base, "vs_baseline": 1.0})
        rate = _gbps(fn_signed, len(signed), args.repeat)
        rows.append({"op": f"{op} signed", "bytes_mib": len(signed) / MiB, "gbps": rate, "vs_baseline": rate / base})
    print(format_table(rows, ["op", "bytes_mib", "gbps", "vs_baseline"]))
    print(f"header bytes: unsigned {len(plain) - args.layers * int(args.layer_mib * MiB)}, "
          f"signed {len(signed) - args.layers * int(args.layer_mib * MiB)}; cores {os.cpu_count()}")
    return {"rows": rows}
