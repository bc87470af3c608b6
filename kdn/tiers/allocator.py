"""Two-level pool allocator in the spirit of Jenga (arXiv 2503.18292): pure offset logic, no memory, no torch.

Level 1: one arena of ``num_pages`` large pages of ``page_bytes``. Level 2: a page is carved into equal slots for one
*size class*; an object takes one slot; a page returns to the arena when all its slots are free, so any class can
reuse it. Offsets are bytes from the arena start; every slot starts at a multiple of ``granularity``.

**Page size** (:func:`page_bytes_for`). Jenga's rule: the page is the least common multiple of the slot sizes in
use, so each of them tiles a page exactly. Declared object sizes are rounded up to ``granularity`` first and their
LCM is scaled by the largest integer that keeps the page within ``arena / min_pages`` (a bigger page gives
undeclared sizes closer-fitting slots). When the LCM itself exceeds that bound (it explodes for sizes such as
32 MiB + header and 5.6 MiB + header), the page is the largest multiple of the *largest* declared size within the
bound: that class stays exact and the others fall back to the divisor rule below.

**Size classes** (the divisor rule). An object of ``u`` granules gets the slot ``floor(N / n)`` granules where
``N`` granules make a page and ``n = floor(N / u)`` is the most slots of at least ``u`` granules a page holds.
Every class therefore tiles the page with a tail under ``n`` granules (so the page is a common multiple of all
slot sizes, which is what the LCM rule wants, with no explosion), declared sizes whose rounded size divides the
page are exact, and the rounding waste of any other size is below ``1 / (n + 1)`` plus one granule. For small
objects (``n > 64``) ``n`` is rounded down to 6 significant bits, which bounds the number of classes (32 per
doubling of size) at under 1/32 extra waste. Variable compressed sizes thus land in a handful of nearby classes.

**Borrowing.** When a class has no free slot and no page is free, an object may take a free slot of a larger
class whose slot is at most ``borrow_factor`` times its own, before anybody evicts: a slot stranded in a
half-used page of another class is better used than an LRU object dropped.

Thread-safe (one lock). ``stats()`` splits the arena into object bytes, internal waste (slot rounding and page
tails), stranded bytes (free slots in partly used pages: free but usable by their class only), free pages and
the remainder of the arena that is no whole page.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

__all__ = ["TwoLevelAllocator", "AllocatorStats", "page_bytes_for", "DEFAULT_MIN_PAGES"]

#: Default lower bound on the number of pages of an arena (the page-size target is ``arena / min_pages``).
DEFAULT_MIN_PAGES = 32
_EXACT_SLOTS = 64  # up to this many slots per page, every n is its own class
_SIG_BITS = 6  # beyond it, n keeps this many significant bits


def _units(size: int, granularity: int) -> int:
    return max(1, -(-int(size) // granularity))


def page_bytes_for(arena_bytes: int, object_sizes: list[int] | tuple[int, ...] = (), granularity: int = 4096,
                   min_pages: int = DEFAULT_MIN_PAGES) -> int:
    """The page size for an arena serving ``object_sizes`` (see the module docstring for the rule)."""
    if arena_bytes < granularity:
        raise ValueError(f"arena of {arena_bytes} bytes is smaller than one granule of {granularity}")
    arena_units = arena_bytes // granularity
    units = sorted({_units(s, granularity) for s in object_sizes if s > 0})
    largest = units[-1] if units else 1
    if largest > arena_units:
        raise ValueError(f"object size {largest * granularity} does not fit an arena of {arena_bytes} bytes")
    target = max(largest, arena_units // max(1, min_pages))
    lcm = math.lcm(*units) if units else 1
    base = lcm if lcm <= target else largest
    return base * (target // base) * granularity


@dataclass(frozen=True)
class AllocatorStats:
    """A snapshot of how the arena's bytes are used (all in bytes)."""

    arena_bytes: int
    page_bytes: int
    pages: int
    free_pages: int
    objects: int
    object_bytes: int
    """Requested bytes of live allocations."""
    slot_bytes: int
    """Slot bytes of live allocations (``>= object_bytes``)."""
    tail_bytes: int
    """Bytes at the end of carved pages that no slot covers."""
    stranded_bytes: int
    """Free slots in partly used pages: free, but usable only by their class (or a borrower)."""
    remainder_bytes: int
    """Arena bytes past the last whole page."""
    classes: int
    """Size classes that own at least one page."""

    @property
    def free_bytes(self) -> int:
        return self.free_pages * self.page_bytes

    @property
    def internal_bytes(self) -> int:
        """Internal fragmentation: slot rounding of live objects plus page tails."""
        return self.slot_bytes - self.object_bytes + self.tail_bytes

    @property
    def wasted_bytes(self) -> int:
        """Bytes neither holding objects nor free for any object: internal + stranded + remainder."""
        return self.internal_bytes + self.stranded_bytes + self.remainder_bytes


class _Class:
    __slots__ = ("slot", "per_page", "partial", "pages")

    def __init__(self, slot: int, per_page: int) -> None:
        self.slot, self.per_page = slot, per_page
        self.partial: dict[int, None] = {}  # pages of this class with a free slot (insertion-ordered set)
        self.pages = 0


class TwoLevelAllocator:
    """Pages of ``page_bytes`` over an arena of ``arena_bytes``; slots of one size class per page."""

    def __init__(self, arena_bytes: int, *, page_bytes: int = 0, object_sizes: list[int] | tuple[int, ...] = (),
                 granularity: int = 4096, min_pages: int = DEFAULT_MIN_PAGES, borrow_factor: float = 1.5) -> None:
        if granularity < 1 or arena_bytes < 1:
            raise ValueError("arena_bytes and granularity must be positive")
        page_bytes = page_bytes or page_bytes_for(arena_bytes, object_sizes, granularity, min_pages)
        if page_bytes % granularity or not granularity <= page_bytes <= arena_bytes:
            raise ValueError(f"page_bytes {page_bytes} must be a multiple of granularity {granularity} and fit "
                             f"the arena of {arena_bytes} bytes")
        self.arena_bytes = int(arena_bytes)
        self.granularity = int(granularity)
        self.page_bytes = int(page_bytes)
        self.num_pages = self.arena_bytes // self.page_bytes
        self.borrow_factor = float(borrow_factor)
        self._page_units = self.page_bytes // self.granularity
        self._lock = threading.Lock()
        self._free_pages = list(range(self.num_pages - 1, -1, -1))  # a stack: low pages first
        self._page_class: list[_Class | None] = [None] * self.num_pages
        self._page_free: list[list[int]] = [[] for _ in range(self.num_pages)]
        self._classes: dict[int, _Class] = {}
        self._live: dict[int, tuple[int, _Class]] = {}  # offset -> (requested size, class)
        self._object_bytes = 0
        self._slot_bytes = 0

    # -- classes ---------------------------------------------------------------------------------------------
    def slot_size(self, size: int) -> int | None:
        """The slot bytes of the class of an object of ``size`` bytes; ``None`` when it exceeds a page."""
        if size > self.page_bytes:
            return None
        n = self._page_units // _units(size, self.granularity)
        if n > _EXACT_SLOTS:
            shift = n.bit_length() - _SIG_BITS
            n = (n >> shift) << shift
        return (self._page_units // n) * self.granularity

    def _class(self, slot: int) -> _Class:
        cls = self._classes.get(slot)
        if cls is None:
            cls = self._classes[slot] = _Class(slot, self.page_bytes // slot)
        return cls

    # -- allocation --------------------------------------------------------------------------------------------
    def allocate(self, size: int) -> int | None:
        """Offset of a slot for ``size`` bytes, or ``None`` when no slot is free (the caller may evict)."""
        if size < 0:
            raise ValueError("size must not be negative")
        slot = self.slot_size(size)
        if slot is None:
            return None
        with self._lock:
            cls = self._class(slot)
            page = self._fullest_partial(cls)
            if page is None and self._free_pages:
                page = self._carve(cls)
            if page is None:
                cls, page = self._borrow(slot)
                if page is None:
                    return None
            free = self._page_free[page]
            index = free.pop()
            if not free:
                del cls.partial[page]
            offset = page * self.page_bytes + index * cls.slot
            self._live[offset] = (size, cls)
            self._object_bytes += size
            self._slot_bytes += cls.slot
            return offset

    def _fullest_partial(self, cls: _Class) -> int | None:
        if not cls.partial:
            return None
        page_free = self._page_free
        return min(cls.partial, key=lambda p: len(page_free[p]))

    def _carve(self, cls: _Class) -> int:
        page = self._free_pages.pop()
        self._page_class[page] = cls
        self._page_free[page] = list(range(cls.per_page - 1, -1, -1))
        cls.partial[page] = None
        cls.pages += 1
        return page

    def _borrow(self, slot: int) -> tuple[_Class, int | None]:
        limit = slot * self.borrow_factor
        for other_slot in sorted(s for s in self._classes if slot < s <= limit):
            other = self._classes[other_slot]
            page = self._fullest_partial(other)
            if page is not None:
                return other, page
        return self._classes[slot], None

    def free(self, offset: int) -> None:
        """Return the slot at ``offset``; raises ``ValueError`` if it is not allocated."""
        with self._lock:
            try:
                size, cls = self._live.pop(offset)
            except KeyError:
                raise ValueError(f"offset {offset} is not allocated") from None
            self._object_bytes -= size
            self._slot_bytes -= cls.slot
            page, within = divmod(offset, self.page_bytes)
            free = self._page_free[page]
            free.append(within // cls.slot)
            if len(free) == cls.per_page:  # the page is empty: back to the arena
                cls.partial.pop(page, None)
                cls.pages -= 1
                self._page_class[page] = None
                free.clear()
                self._free_pages.append(page)
            else:
                cls.partial[page] = None

    def can_allocate(self, size: int) -> bool:
        """Whether :meth:`allocate` of ``size`` would succeed now."""
        slot = self.slot_size(size)
        if slot is None:
            return False
        with self._lock:
            cls = self._classes.get(slot)
            if (cls is not None and cls.partial) or self._free_pages:
                return True
            return any(self._classes[s].partial for s in self._classes if slot < s <= slot * self.borrow_factor)

    def frees_room_for(self, offset: int, size: int) -> bool:
        """Whether freeing the allocation at ``offset`` would let ``size`` bytes be allocated."""
        slot = self.slot_size(size)
        if slot is None:
            return False
        with self._lock:
            held = self._live.get(offset)
            if held is None:
                return False
            cls = held[1]
            if slot <= cls.slot <= slot * self.borrow_factor:
                return True
            page = offset // self.page_bytes
            return len(self._page_free[page]) == cls.per_page - 1  # the last live slot: its page comes free

    def size_of(self, offset: int) -> int:
        """The requested size of the live allocation at ``offset``."""
        with self._lock:
            return self._live[offset][0]

    def page_of(self, offset: int) -> int:
        return offset // self.page_bytes

    # -- accounting --------------------------------------------------------------------------------------------
    def stats(self) -> AllocatorStats:
        with self._lock:
            tail = stranded = classes = 0
            for cls in self._classes.values():
                if cls.pages:
                    classes += 1
                    tail += cls.pages * (self.page_bytes - cls.per_page * cls.slot)
                    stranded += sum(len(self._page_free[p]) for p in cls.partial) * cls.slot
            return AllocatorStats(
                arena_bytes=self.arena_bytes, page_bytes=self.page_bytes, pages=self.num_pages,
                free_pages=len(self._free_pages), objects=len(self._live), object_bytes=self._object_bytes,
                slot_bytes=self._slot_bytes, tail_bytes=tail, stranded_bytes=stranded,
                remainder_bytes=self.arena_bytes - self.num_pages * self.page_bytes, classes=classes)

    def live(self) -> dict[int, int]:
        """A snapshot ``{offset: requested size}`` of every live allocation (for checks and tests)."""
        with self._lock:
            return {off: size for off, (size, _) in self._live.items()}

    def slot_bytes_at(self, offset: int) -> int:
        """The slot size of the live allocation at ``offset``."""
        with self._lock:
            return self._live[offset][1].slot


class PoolEntry:
    """One object's slot in a :class:`PoolIndex`."""

    __slots__ = ("key", "offset", "size", "pins", "ready", "dead")

    def __init__(self, key: str, offset: int, size: int) -> None:
        self.key, self.offset, self.size = key, offset, size
        self.pins = 1  # the writer's pin until publish()
        self.ready = False  # published: visible to get/contains/keys
        self.dead = False  # dropped from the index while pinned: its slot is freed by the last unpin()


class PoolIndex:
    """Keys -> slots of a :class:`TwoLevelAllocator`, in LRU order, with pins; the policy both pool tiers share.

    Not locked: the owning tier calls it under its own lock. A pinned entry is never evicted and its slot never
    reused; dropping it (delete, eviction) only hides it until the last pin goes. Eviction walks the LRU order:
    among the ``victim_window`` least recently used unpinned objects it takes the first whose slot would make room
    (same or borrowable class, or the last live slot of its page); if none does, the least recently used one.
    """

    def __init__(self, allocator: TwoLevelAllocator, victim_window: int = 8) -> None:
        self.allocator = allocator
        self.victim_window = victim_window
        self._lru: dict[str, PoolEntry] = {}  # ready entries, oldest first
        self._pending: dict[str, PoolEntry] = {}  # reserved, being written
        self._used = 0
        self._dead_pinned = 0

    @property
    def used_bytes(self) -> int:
        """Bytes of ready objects."""
        return self._used

    @property
    def pinned(self) -> int:
        """Entries with at least one pin (writes in flight, leases, retired-but-leased objects)."""
        return (sum(1 for e in self._lru.values() if e.pins) + len(self._pending) + self._dead_pinned)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: str) -> bool:
        return key in self._lru

    def is_pending(self, key: str) -> bool:
        return key in self._pending

    def items(self) -> list[tuple[str, int]]:
        return [(k, e.size) for k, e in self._lru.items()]

    def lookup(self, key: str, *, touch: bool = True) -> PoolEntry | None:
        entry = self._lru.get(key)
        if entry is not None and touch:
            self._lru[key] = self._lru.pop(key)
        return entry

    def pin(self, key: str) -> PoolEntry | None:
        """Pin a ready entry (and mark it recently used); ``None`` on a miss."""
        entry = self.lookup(key)
        if entry is not None:
            entry.pins += 1
        return entry

    def unpin(self, entry: PoolEntry) -> None:
        if entry.pins <= 0:
            raise RuntimeError(f"unbalanced unpin of {entry.key}")
        entry.pins -= 1
        if entry.pins == 0 and entry.dead:
            self._dead_pinned -= 1
            self.allocator.free(entry.offset)

    def reserve(self, key: str, size: int, on_victim=None) -> PoolEntry | None:
        """A pending entry (pinned by the writer) for ``size`` bytes, evicting LRU objects as needed; ``None``
        when it cannot be placed. ``on_victim(entry)`` runs for each evicted object before its slot is freed."""
        alloc = self.allocator
        if alloc.slot_size(size) is None:
            return None
        while True:
            offset = alloc.allocate(size)
            if offset is not None:
                entry = self._pending[key] = PoolEntry(key, offset, size)
                return entry
            victim = self._victim(size)
            if victim is None:
                return None
            if on_victim is not None:
                on_victim(victim)
            self.remove(victim.key)

    def _victim(self, size: int) -> PoolEntry | None:
        oldest = None
        seen = 0
        for entry in self._lru.values():
            if entry.pins:
                continue
            if oldest is None:
                oldest = entry
            if self.allocator.frees_room_for(entry.offset, size):
                return entry
            seen += 1
            if seen >= self.victim_window:
                break
        return oldest

    def publish(self, entry: PoolEntry) -> None:
        """Make a reserved entry visible (most recently used) and drop the writer's pin."""
        del self._pending[entry.key]
        entry.ready = True
        self._lru[entry.key] = entry
        self._used += entry.size
        self.unpin(entry)

    def abort(self, entry: PoolEntry) -> None:
        """Give up a reserved entry (its write failed)."""
        del self._pending[entry.key]
        entry.pins = 0
        self.allocator.free(entry.offset)

    def remove(self, key: str) -> PoolEntry | None:
        """Drop a ready entry from the index; its slot is freed now or, if pinned, by the last unpin."""
        entry = self._lru.pop(key, None)
        if entry is None:
            return None
        self._used -= entry.size
        entry.ready = False
        if entry.pins:
            entry.dead = True
            self._dead_pinned += 1
        else:
            self.allocator.free(entry.offset)
        return entry
