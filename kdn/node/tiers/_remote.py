"""Helpers shared by tiers whose objects live in a remote store (Redis, S3).

``LruBudget`` accounts object bytes. The store may drop objects behind the tier's back (TTL expiry, Redis
``maxmemory`` eviction, another client's delete), so the accounting is best effort: it learns of such losses on the
next miss, delete or inventory scan. It does guarantee that the bytes it accounts never exceed the capacity.
``verify`` checks an object read back against everything its key says (and, with the node's keyring, that it is
authentic: the stores are shared infrastructure, not trusted with integrity). ``OutageLog`` reports backend failures
once per outage instead of once per call; ``RetryOnce`` runs the first inventory scan lazily. ``RemoteTier`` ties
them together for the Redis and S3 tiers.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kdn.errors import CorruptObject, InvalidRequest
from kdn.format.chunk import verify_object
from kdn.format.keys import ChunkKey
from kdn.node.tiers.base import Buffer, Tier

if TYPE_CHECKING:
    from kdn.format.mac import Keyring

__all__ = ["RemoteTier", "LruBudget", "OutageLog", "RetryOnce", "expected_fields", "is_chunk_key", "verify"]


def expected_fields(key: str) -> dict[str, Any]:
    """What a chunk key says about its object (fingerprint and codec); empty for a key of another form."""
    try:
        parsed = ChunkKey.parse(key)
    except InvalidRequest:
        return {}
    return {"fingerprint": parsed.fingerprint, "codec": parsed.codec}


def is_chunk_key(key: str) -> bool:
    """Whether ``key`` has the chunk key form (inventories skip anything else under a tier's prefix)."""
    return bool(expected_fields(key))


def verify(data: Buffer, key: str, keyring: Keyring | None = None) -> None:
    """Raise :class:`~kdn.errors.CorruptObject` unless ``data`` is the intact object stored under ``key``: header
    and section checksums, and the key, layout fingerprint and codec the key names; with a ``keyring`` also its
    header MAC and keyed section digests under the key's tenant (:class:`~kdn.format.mac.ForgedObject`)."""
    verify_object(data, key=key, keyring=keyring, **expected_fields(key))


class LruBudget:
    """Thread-safe LRU map of key -> object size, bounded by ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._sizes

    def admit(self, items: Sequence[tuple[str, int]]) -> tuple[list[bool], list[tuple[str, int]], set[str]]:
        """Reserve room for ``(key, size)`` items, in order, before they are written.

        Returns per item whether it fits (a tracked key is refreshed and fits; an object larger than the capacity
        never does), the least recently used keys evicted from the accounting to make room (the caller deletes
        them from the store), and the keys of this batch that later items of the same batch evicted again (the
        caller need not write them; they count as stored, then evicted).
        """
        fits: list[bool] = []
        victims: list[tuple[str, int]] = []
        admitted: set[str] = set()
        dropped: set[str] = set()
        with self._lock:
            for key, size in items:
                if key in self._sizes:
                    self._sizes.move_to_end(key)
                    fits.append(True)
                    continue
                if size > self.capacity:
                    fits.append(False)
                    continue
                while self._used + size > self.capacity:
                    victim, victim_size = self._sizes.popitem(last=False)
                    self._used -= victim_size
                    if victim in admitted:
                        dropped.add(victim)
                    else:
                        victims.append((victim, victim_size))
                self._sizes[key] = size
                self._used += size
                admitted.add(key)
                dropped.discard(key)
                fits.append(True)
        return fits, victims, dropped

    def touch(self, key: str) -> None:
        """Mark ``key`` as recently used (a hit)."""
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)

    def forget(self, keys: Iterable[str]) -> None:
        """Stop accounting ``keys`` (deleted, found missing, or a put that failed)."""
        with self._lock:
            for key in keys:
                size = self._sizes.pop(key, None)
                if size is not None:
                    self._used -= size

    def rebuild(self, inventory: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Replace the accounting with an inventory scan, keeping the known LRU order (new keys count as most
        recent). Returns the objects that do not fit the capacity, least recent first; the caller evicts them."""
        found = dict(inventory)
        overflow: list[tuple[str, int]] = []
        with self._lock:
            order = [k for k in self._sizes if k in found] + [k for k in found if k not in self._sizes]
            self._sizes.clear()
            self._used = 0
            for key in reversed(order):  # keep the most recent ones
                size = found[key]
                if self._used + size > self.capacity:
                    overflow.append((key, size))
                    continue
                self._sizes[key] = size
                self._used += size
            self._sizes = OrderedDict(reversed(self._sizes.items()))
        overflow.reverse()
        return overflow


class RetryOnce:
    """Runs ``action`` (which returns True on success) until it has succeeded once, at most every ``interval_s``.

    Remote tiers use it to rebuild their accounting from an inventory scan on first use, not in the constructor.
    """

    def __init__(self, action: Callable[[], bool], interval_s: float = 5.0) -> None:
        self._action = action
        self._interval = interval_s
        self._done = False
        self._next = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if self._done:
            return
        with self._lock:
            if self._done or time.monotonic() < self._next:
                return
            self._done = bool(self._action())
            self._next = time.monotonic() + self._interval

    def mark_done(self) -> None:
        self._done = True


class OutageLog:
    """Logs backend failures without flooding: the first failure of an outage at ERROR, then at most one ERROR per
    ``interval_s`` (with the count of failures in between), and the recovery at WARNING."""

    def __init__(self, logger: logging.Logger, backend: str, interval_s: float = 30.0) -> None:
        self._logger = logger
        self._backend = backend
        self._interval = interval_s
        self._down = False
        self._last = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def failed(self, operation: str, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if self._down and now - self._last < self._interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._down, self._last = True, now
        more = f" ({suppressed} more failures since the last report)" if suppressed else ""
        self._logger.error("%s %s failed (answered as a miss / False): %s: %s%s", self._backend, operation,
                           type(exc).__name__, exc, more)

    def ok(self) -> None:
        if self._down:
            with self._lock:
                was_down, self._down, self._suppressed = self._down, False, 0
            if was_down:
                self._logger.warning("%s is reachable again", self._backend)


class RemoteTier(Tier):
    """Base of the tiers over a remote store: the byte budget and its LRU eviction, the lazy first inventory,
    verified demotion and the dropping of bad objects. Subclasses do the store I/O in ``_list``, ``_evict`` and
    ``_remove``, and call ``_first_use()`` at the start of every operation."""

    #: Largest object the store accepts (Redis: 512 MiB strings).
    max_object_bytes: int = 1 << 62

    def __init__(self, capacity: int, logger: logging.Logger, backend: str) -> None:
        super().__init__()
        self._log = logger
        self._backend = backend
        self._budget = LruBudget(capacity)
        self._outage = OutageLog(logger, backend)
        self._first_use = RetryOnce(lambda: self._inventory() is not None)

    @property
    def capacity_bytes(self) -> int:
        return self._budget.capacity

    @property
    def used_bytes(self) -> int:
        self._first_use()
        return self._budget.used

    def keys(self) -> Iterator[tuple[str, int]]:
        """List every chunk key under the tier's prefix (a fresh scan; it also rebuilds the byte accounting)."""
        return iter(self._inventory() or ())

    @abstractmethod
    def _list(self) -> list[tuple[str, int]] | None:
        """Every chunk key under the prefix with its size, least recently written first; None during an outage."""

    @abstractmethod
    def _evict(self, victims: Sequence[tuple[str, int]]) -> None:
        """Delete objects the accounting dropped, passing each to ``_demote`` first when ``on_evict`` is set."""

    @abstractmethod
    def _remove(self, key: str) -> None:
        """Delete one object, best effort."""

    def _inventory(self) -> list[tuple[str, int]] | None:
        found = self._list()
        if found is None:
            return None
        self._first_use.mark_done()
        overflow = self._budget.rebuild(found)
        if overflow:
            self._log.warning("%s: %d objects exceed the capacity; evicting them", self._backend, len(overflow))
            self._evict(overflow)
            dropped = {key for key, _ in overflow}
            found = [item for item in found if item[0] not in dropped]
        return found

    def _admit(self, items: Sequence[tuple[str, Buffer]]) -> tuple[list[bool], list[int], list[bool]]:
        """Account a put batch: evict what must go; returns the results so far (items that a later item of the
        batch evicted again count as stored, then evicted), the indices still to write, and which keys were
        accounted before (probably present: worth a cheap existence check before shipping their bytes)."""
        known = [key in self._budget for key, _ in items]
        too_big = self._budget.capacity + 1
        fits, victims, dropped = self._budget.admit(
            [(key, len(data) if len(data) <= self.max_object_bytes else too_big) for key, data in items])
        if victims:
            self._evict(victims)
        results = [fits[i] and key in dropped for i, (key, _) in enumerate(items)]
        for key in dropped:
            self._evicted(key, next(d for k, d in reversed(items) if k == key))
        todo = [i for i, ok in enumerate(fits) if ok and items[i][0] not in dropped]
        return results, todo, known

    def _checked(self, key: str, data: Any) -> Any:
        """``data`` when it verifies as ``key``'s object; otherwise drop the stored object and return None."""
        try:
            verify(data, key, self.keyring)
        except CorruptObject as exc:
            self._log.warning("%s: dropping bad object under %r: %s", self._backend, key, exc)
            self._budget.forget([key])
            self._remove(key)
            self._dropped(key)
            return None
        self._budget.touch(key)
        return data

    def _demote(self, key: str, data: Buffer) -> None:
        try:
            verify(data, key, self.keyring)
        except CorruptObject as exc:
            self._log.warning("%s: evicted object under %r is bad, not demoted: %s", self._backend, key, exc)
            return
        self._evicted(key, data)
