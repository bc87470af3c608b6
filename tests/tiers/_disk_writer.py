"""Helper process for the kill -9 test: put chunk objects into a DiskTier, printing each acknowledged key.

Usage: ``python -m tests.tiers._disk_writer PATH SEED``. Object ``i`` is ``make_object(make_key(f"{seed}-{i}"),
payload)`` so the test can rebuild the expected bytes of every acknowledged key.
"""

import sys
import time

from kdn.node.tiers.disk import DiskTier
from tests.tiers.conformance import make_key, make_object


def writer_object(seed: int, i: int) -> tuple[str, bytes]:
    key = make_key(f"{seed}-{i}")
    return key, make_object(key, 50_000 + (i * 7919) % 400_000)


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    tier = DiskTier(path, capacity=1 << 40)
    deadline = time.monotonic() + 60  # bounded: the test kills it long before
    for i in range(100_000):
        if time.monotonic() > deadline:
            break
        key, data = writer_object(seed, i)
        if tier.put(key, data):
            sys.stdout.write(key + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
