"""CPU memory tier: a bounded LRU map of immutable chunk objects."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kdn.node.tiers.base import Buffer, Tier
from kdn.wire.buffers import is_fresh

__all__ = ["MemoryTier", "MemoryTierConfig"]


@dataclass
class MemoryTierConfig:
    capacity: int = 1 << 30
    """Bytes of chunk objects held in process memory."""


class MemoryTier(Tier):
    """Objects held as ``bytes`` in an LRU order; a get refreshes recency; puts evict the least recently used."""

    kind = "memory"
    durable = False
    config_class = MemoryTierConfig

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self._capacity = int(capacity)
        self._objects: OrderedDict[str, Buffer] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: MemoryTierConfig, data_dir: str) -> MemoryTier:
        return cls(config.capacity)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        results = []
        evicted: list[tuple[str, bytes]] = []
        with self._lock:
            for key, data in items:
                if key in self._objects:
                    self._objects.move_to_end(key)
                    results.append(True)
                    continue
                size = len(data)
                if size > self._capacity:
                    results.append(False)
                    continue
                while self._used + size > self._capacity:
                    old_key, old = self._objects.popitem(last=False)
                    self._used -= len(old)
                    evicted.append((old_key, old))
                # A bytearray or a fresh receive buffer is taken over as is (the caller hands ownership over;
                # objects are immutable).
                self._objects[key] = data if isinstance(data, (bytes, bytearray)) or is_fresh(data) else bytes(data)
                self._used += size
                results.append(True)
        for key, data in evicted:
            self._evicted(key, data)
        return results

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        with self._lock:
            for key in keys:
                data = self._objects.get(key)
                if data is not None:
                    self._objects.move_to_end(key)
                out.append(data)
        return out

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._objects for key in keys]

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        out = []
        with self._lock:
            for key in keys:
                data = self._objects.pop(key, None)
                if data is not None:
                    self._used -= len(data)
                out.append(data is not None)
        return out

    def keys(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            snapshot = [(k, len(v)) for k, v in self._objects.items()]
        return iter(snapshot)
