"""Two-level pool allocator in the spirit of Jenga (arXiv 2503.18292): pure offset logic, no memory, no torch.

Level 1: an arena of large pages of ``page_bytes``; a page goes back to the arena as soon as its last object
leaves, so any kind of object can reuse it. Level 2, per page:

- *slab pages* are carved into equal slots of one declared size class (a layout's full-chunk object size); an
  object whose rounded size is at most a slot and wastes at most ``slab_tolerance`` of it takes a slot;
- *variable pages* hold every other object (compressed chunks, final partial chunks) as extents placed first-fit;
  holes coalesce, also across adjacent variable pages (they are taken from the bottom of the arena, slabs from the
  top), and an extent may span pages, so objects larger than a page fit too.

Sizes round up to ``granularity`` (every object's alignment). The page (:func:`page_bytes_for`) is Jenga's LCM of
the declared slot sizes, scaled toward ``arena / min_pages``; real chunk sizes (32 MiB + header, 5.6 MiB + header)
make the LCM explode, and then the page is the multiple of a declared size in ``[bound / 2, bound]`` whose worst
page tail is smallest. A declared size above the bound gets no slab class (its objects are variable extents, which
span pages) unless no declared size is within it: otherwise one large size (a hybrid model's 208 MiB window object)
would force pages past the bound and tails of up to half a page on the other classes. Before anything is evicted,
a slab-class object may take a hole of the variable pages and a variable object a free slot at most
``borrow_factor`` times its size. Size classes for variable sizes were tried
and rejected: a partly used page per class stranded half the arena (docs/tiers.md has the measurements).

Thread-safe (one lock). :meth:`TwoLevelAllocator.stats` splits the arena into object bytes, internal waste
(rounding, slab page tails), stranded bytes (free slots of partly used slab pages, holes of variable pages), free
pages and the remainder past the last page.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass

__all__ = ["TwoLevelAllocator", "AllocatorStats", "page_bytes_for", "DEFAULT_MIN_PAGES", "PoolIndex", "PoolEntry"]

#: Default lower bound on the number of pages of an arena (the page-size bound is ``arena / min_pages``).
DEFAULT_MIN_PAGES = 64
_VARIABLE = "variable"


def _units(size: int, granularity: int) -> int:
    return max(1, -(-int(size) // granularity))


def page_bytes_for(arena_bytes: int, object_sizes: list[int] | tuple[int, ...] = (), granularity: int = 4096,
                   min_pages: int = DEFAULT_MIN_PAGES) -> int:
    """The page size for an arena whose slab classes are ``object_sizes`` (rule in the module docstring)."""
    if granularity < 1 or arena_bytes < granularity:
        raise ValueError(f"arena of {arena_bytes} bytes is smaller than one granule of {granularity}")
    arena_units = arena_bytes // granularity
    units = sorted({_units(s, granularity) for s in object_sizes if s > 0})
    largest = units[-1] if units else 1
    if largest > arena_units:
        raise ValueError(f"object size {largest * granularity} does not fit an arena of {arena_bytes} bytes")
    bound = arena_units // max(1, min_pages)
    if units and units[0] <= bound:  # larger declared sizes get no slab class: they would force huge pages
        units = [u for u in units if u <= bound]
        largest = units[-1]
    bound = max(largest, bound)
    if not units:
        return bound * granularity
    lcm = math.lcm(*units)
    if lcm <= bound:
        return lcm * (bound // lcm) * granularity
    low = max(largest, bound // 2)
    candidates = {k * u for u in units for k in range(-(-low // u), bound // u + 1)}
    return min(candidates, key=lambda p: (max(p % u for u in units) / p, -p)) * granularity


@dataclass(frozen=True)
class AllocatorStats:
    """A snapshot of the arena, in bytes: ``object_bytes`` requested by live allocations, ``reserved_bytes`` held
    for them (slots and extents), ``tail_bytes`` that no slot of a slab page covers, ``stranded_bytes`` free in
    partly used slab pages and variable-page holes, ``remainder_bytes`` past the last whole page."""

    arena_bytes: int
    page_bytes: int
    pages: int
    free_pages: int
    slab_pages: int
    variable_pages: int
    objects: int
    object_bytes: int
    reserved_bytes: int
    tail_bytes: int
    stranded_bytes: int
    remainder_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.free_pages * self.page_bytes

    @property
    def internal_bytes(self) -> int:
        """Internal fragmentation: rounding of live objects to granules and slots, plus slab page tails."""
        return self.reserved_bytes - self.object_bytes + self.tail_bytes

    @property
    def wasted_bytes(self) -> int:
        """Bytes neither holding objects nor free for any object: internal + stranded + remainder."""
        return self.internal_bytes + self.stranded_bytes + self.remainder_bytes


class _Slab:
    __slots__ = ("slot", "per_page", "partial", "pages")

    def __init__(self, slot: int, per_page: int) -> None:
        self.slot, self.per_page = slot, per_page
        self.partial: dict[int, None] = {}  # pages with a free slot (an insertion-ordered set)
        self.pages = 0


class TwoLevelAllocator:
    """Slab and variable pages of ``page_bytes`` over an arena of ``arena_bytes`` (see the module docstring)."""

    def __init__(self, arena_bytes: int, *, object_sizes: list[int] | tuple[int, ...] = (), page_bytes: int = 0,
                 granularity: int = 4096, min_pages: int = DEFAULT_MIN_PAGES, slab_tolerance: float = 1 / 16,
                 borrow_factor: float = 1.25) -> None:
        page_bytes = page_bytes or page_bytes_for(arena_bytes, object_sizes, granularity, min_pages)
        if page_bytes % granularity or not granularity <= page_bytes <= arena_bytes:
            raise ValueError(f"page_bytes {page_bytes} must be a multiple of granularity {granularity} within "
                             f"the arena of {arena_bytes} bytes")
        self.arena_bytes, self.granularity, self.page_bytes = int(arena_bytes), int(granularity), int(page_bytes)
        self.num_pages = self.arena_bytes // self.page_bytes
        self.slab_tolerance, self.borrow_factor = float(slab_tolerance), float(borrow_factor)
        slots = sorted({_units(s, granularity) * granularity for s in object_sizes if 0 < s <= page_bytes})
        self._slabs = [_Slab(s, page_bytes // s) for s in slots]
        self._slots = slots
        self._lock = threading.Lock()
        self._free_pages = list(range(self.num_pages))  # sorted: variable pages take the lowest, slabs the highest
        self._kind: list[_Slab | str | None] = [None] * self.num_pages
        self._page_live = [0] * self.num_pages  # allocations overlapping each page
        self._page_free: dict[int, list[int]] = {}  # slab page -> free slot indices
        self._holes: list[tuple[int, int]] = []  # free (offset, length) runs of variable pages, sorted, coalesced
        self._var_pages = 0
        self._live: dict[int, tuple[int, int, _Slab | None]] = {}  # offset -> (size, reserved bytes, slab)
        self._object_bytes = self._reserved_bytes = 0

    @property
    def slot_sizes(self) -> list[int]:
        """The slab classes' slot sizes."""
        return list(self._slots)

    def fits(self, size: int) -> bool:
        """Whether an object of ``size`` bytes can ever be allocated (in an empty arena)."""
        return 0 <= size <= self.num_pages * self.page_bytes

    def _slab_for(self, size: int) -> _Slab | None:
        need = _units(size, self.granularity) * self.granularity
        i = bisect.bisect_left(self._slots, need)
        if i < len(self._slots) and self._slots[i] - size <= self._slots[i] * self.slab_tolerance:
            return self._slabs[i]
        return None

    # -- allocation --------------------------------------------------------------------------------------------
    def allocate(self, size: int) -> int | None:
        """Offset of ``size`` free bytes, or ``None`` when there is no room now (the caller may evict)."""
        if not self.fits(size):
            return None
        need = _units(size, self.granularity) * self.granularity
        with self._lock:
            slab = self._slab_for(size)
            if slab is not None:
                placed = self._from_slab(slab, new_page=True) or self._from_holes(need, new_page=False)
            else:
                placed = self._from_holes(need, new_page=True) or self._borrow(size)
            if placed is None:
                return None
            offset, reserved, owner = placed
            self._live[offset] = (size, reserved, owner)
            for page in self._pages_of(offset, reserved):
                self._page_live[page] += 1
            self._object_bytes += size
            self._reserved_bytes += reserved
            return offset

    def _from_slab(self, slab: _Slab, new_page: bool) -> tuple[int, int, _Slab] | None:
        if slab.partial:
            page = min(slab.partial, key=lambda p: len(self._page_free[p]))  # fill the fullest page first
        elif new_page and self._free_pages:
            page = self._free_pages.pop()
            self._kind[page] = slab
            self._page_free[page] = list(range(slab.per_page - 1, -1, -1))
            slab.partial[page] = None
            slab.pages += 1
        else:
            return None
        free = self._page_free[page]
        index = free.pop()
        if not free:
            del slab.partial[page]
        return page * self.page_bytes + index * slab.slot, slab.slot, slab

    def _pages_of(self, offset: int, length: int) -> range:
        return range(offset // self.page_bytes, (offset + length - 1) // self.page_bytes + 1)

    def _from_holes(self, need: int, new_page: bool) -> tuple[int, int, None] | None:
        """First fit over the holes of variable pages. Extents may span adjacent variable pages (so an object
        may be larger than a page): variable pages are taken from the bottom of the arena, slabs from the top."""
        carved: list[int] = []
        while True:
            for i, (start, length) in enumerate(self._holes):
                if length >= need:
                    if length == need:
                        del self._holes[i]
                    else:
                        self._holes[i] = (start + need, length - need)
                    used = self._pages_of(start, need)
                    for page in carved:  # pages carved in vain (the extent fit elsewhere) go back
                        if page not in used:
                            self._release(page)
                    return start, need, None
            if not new_page or not self._free_pages:
                for page in carved:  # no room after all: give back the pages carved for this call
                    self._release(page)
                return None
            page = self._free_pages.pop(0)
            carved.append(page)
            self._kind[page] = _VARIABLE
            self._var_pages += 1
            self._add_hole(page * self.page_bytes, self.page_bytes)

    def _borrow(self, size: int) -> tuple[int, int, _Slab] | None:
        for slot, slab in zip(self._slots, self._slabs):
            if size <= slot <= size * self.borrow_factor and slab.partial:
                return self._from_slab(slab, new_page=False)
        return None

    def free(self, offset: int) -> None:
        """Return the allocation at ``offset``; raises ``ValueError`` if it is not allocated."""
        with self._lock:
            try:
                size, reserved, slab = self._live.pop(offset)
            except KeyError:
                raise ValueError(f"offset {offset} is not allocated") from None
            self._object_bytes -= size
            self._reserved_bytes -= reserved
            page, within = divmod(offset, self.page_bytes)
            if slab is not None:
                self._page_free[page].append(within // slab.slot)
                slab.partial[page] = None
            else:
                self._add_hole(offset, reserved)
            for page in self._pages_of(offset, reserved):
                self._page_live[page] -= 1
                if not self._page_live[page]:
                    self._release(page)

    def _release(self, page: int) -> None:
        """Return an empty page to the arena."""
        kind = self._kind[page]
        if isinstance(kind, _Slab):
            kind.partial.pop(page, None)
            kind.pages -= 1
            del self._page_free[page]
        else:
            self._cut_hole(page * self.page_bytes, self.page_bytes)
            self._var_pages -= 1
        self._kind[page] = None
        bisect.insort(self._free_pages, page)

    def _add_hole(self, start: int, length: int) -> None:
        holes = self._holes
        i = bisect.bisect_left(holes, (start, 0))
        if i < len(holes) and start + length == holes[i][0]:
            length += holes.pop(i)[1]
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] == start:
            i -= 1
            start, length = holes[i][0], holes[i][1] + length
            del holes[i]
        holes.insert(i, (start, length))

    def _cut_hole(self, start: int, length: int) -> None:
        """Remove ``[start, start + length)`` (a whole empty page) from the hole that covers it."""
        i = bisect.bisect_right(self._holes, (start, float("inf"))) - 1
        hole_start, hole_len = self._holes.pop(i)
        if start + length < hole_start + hole_len:
            self._holes.insert(i, (start + length, hole_start + hole_len - start - length))
        if hole_start < start:
            self._holes.insert(i, (hole_start, start - hole_start))

    def frees_room_for(self, offset: int, size: int) -> bool:
        """Whether freeing the allocation at ``offset`` would let ``size`` bytes be allocated (eviction hint)."""
        if not self.fits(size):
            return False
        need = _units(size, self.granularity) * self.granularity
        with self._lock:
            held = self._live.get(offset)
            if held is None:
                return False
            _, reserved, slab = held
            if any(self._page_live[p] == 1 for p in self._pages_of(offset, reserved)):
                return True  # a page comes free
            target = self._slab_for(size)
            if slab is not None:
                return slab is target or (target is None and size <= slab.slot <= size * self.borrow_factor)
            length = reserved
            i = bisect.bisect_left(self._holes, (offset, 0))
            if i < len(self._holes) and self._holes[i][0] == offset + reserved:
                length += self._holes[i][1]
            if i > 0 and sum(self._holes[i - 1]) == offset:
                length += self._holes[i - 1][1]
            return length >= need

    # -- accounting --------------------------------------------------------------------------------------------
    def stats(self) -> AllocatorStats:
        with self._lock:
            tail = stranded = slab_pages = 0
            for slab in self._slabs:
                slab_pages += slab.pages
                tail += slab.pages * (self.page_bytes - slab.per_page * slab.slot)
                stranded += sum(len(self._page_free[p]) for p in slab.partial) * slab.slot
            stranded += sum(length for _, length in self._holes)
            return AllocatorStats(
                arena_bytes=self.arena_bytes, page_bytes=self.page_bytes, pages=self.num_pages,
                free_pages=len(self._free_pages), slab_pages=slab_pages, variable_pages=self._var_pages,
                objects=len(self._live), object_bytes=self._object_bytes, reserved_bytes=self._reserved_bytes,
                tail_bytes=tail, stranded_bytes=stranded,
                remainder_bytes=self.arena_bytes - self.num_pages * self.page_bytes)

    def live(self) -> dict[int, tuple[int, int]]:
        """A snapshot ``{offset: (requested size, reserved bytes)}`` of every live allocation."""
        with self._lock:
            return {off: (size, reserved) for off, (size, reserved, _) in self._live.items()}

    def page_kinds(self) -> list[str]:
        """Per page: ``"free"``, ``"variable"`` or ``"slab:<slot bytes>"`` (for checks and tests)."""
        with self._lock:
            return ["free" if k is None else k if isinstance(k, str) else f"slab:{k.slot}" for k in self._kind]


class PoolEntry:
    """One object's slot in a :class:`PoolIndex`."""

    __slots__ = ("key", "offset", "size", "pad", "pins", "ready", "dead")

    def __init__(self, key: str, offset: int, size: int, pad: int = 0) -> None:
        self.key, self.offset, self.size, self.pad = key, offset, size, pad  # the object starts at offset + pad
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

    def __init__(self, allocator: TwoLevelAllocator, victim_window: int = 64) -> None:
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

    def reserve(self, key: str, size: int, on_victim=None, pad: int = 0) -> PoolEntry | None:
        """A pending entry (pinned by the writer) for ``size`` bytes placed ``pad`` bytes into its allocation,
        evicting LRU objects as needed; ``None`` when it cannot be placed. ``on_victim(entry)`` runs for each
        evicted object before its slot is freed."""
        alloc = self.allocator
        if not alloc.fits(size + pad):
            return None
        while True:
            offset = alloc.allocate(size + pad)
            if offset is not None:
                entry = self._pending[key] = PoolEntry(key, offset, size, pad)
                return entry
            victim = self._victim(size + pad)
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
