"""The tiers of one node, fastest first: write policy, promotion on hit, demotion on eviction.

- ``write-through``: a put goes to the top tier and to every durable tier below it.
- ``write-back``: a put goes to the top tier only; an object evicted from a tier is demoted to the next tier
  below that has room, instead of being lost.
- A get searches top-down; a hit below the top tier is promoted to the top tier, unless ``promote_on_hit`` is
  off (the controller turns it off when it moves objects between tiers itself: cost-driven placement).

Every change of which tier holds which key is reported through ``on_change(added, removed)`` so the node can
tell the controller (``added``: ``(key, tier, size)``; ``removed``: ``(key, tier)``).

Bad copies heal (docs/security.md, "Healing"): a tier that drops a bad object on its own (disk, Redis, S3 verify
every read, with the node's keyring, which the stack hands every durable tier: a forged object written straight
into a store is a miss before it is served or promoted) reports it through ``on_drop`` and the removal reaches
the controller; objects of tiers that do not
verify themselves (memory, pinned, GPU) have their header checked on every get (checksum, key, fingerprint and
codec; with the keyring its MAC), and a bad one is dropped and the next tier tried, so a corrupt memory copy never
shadows a good disk copy. :meth:`TierStack.scrub` fully verifies every copy of reported keys (a client that got a
bad copy says so) and drops the bad ones. Every dropped copy is counted (``dropped``, and ``on_bad``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kdn.errors import ConfigError, CorruptObject
from kdn.format.chunk import verify_object
from kdn.node.tiers._remote import expected_fields
from kdn.node.tiers.base import Buffer, Tier

if TYPE_CHECKING:
    from kdn.format.mac import Keyring

__all__ = ["TierStack", "WRITE_POLICIES"]

log = logging.getLogger(__name__)

WRITE_POLICIES = ("write-through", "write-back")
ChangeCallback = Callable[[list[tuple[str, str, int]], list[tuple[str, str]]], None]


class TierStack:
    """Ordered tiers behaving as one store."""

    def __init__(self, tiers: Sequence[Tier], write_policy: str = "write-through",
                 on_change: ChangeCallback | None = None, keyring: Keyring | None = None,
                 on_bad: Callable[[], None] | None = None) -> None:
        if not tiers:
            raise ConfigError("a node needs at least one tier")
        if write_policy not in WRITE_POLICIES:
            raise ConfigError(f"write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        names = [t.kind for t in tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"each tier kind may appear once per node, got {names}")
        self.tiers = list(tiers)
        self.write_policy = write_policy
        self.on_change = on_change
        self.promote_on_hit = True
        self.keyring = keyring
        self.on_bad = on_bad
        """Called once per bad copy dropped (the node counts them)."""
        self.dropped = 0
        """Bad copies dropped (found by a tier, a get's header check or a scrub)."""
        for i, tier in enumerate(self.tiers):
            tier.on_evict = self._make_evict_handler(i)
            tier.on_drop = self._make_drop_handler(tier)
            if tier.durable and keyring is not None:
                tier.keyring = keyring  # the store behind it is not trusted: it authenticates what it reads

    def _emit(self, added: list[tuple[str, str, int]], removed: list[tuple[str, str]]) -> None:
        if self.on_change is not None and (added or removed):
            self.on_change(added, removed)

    def _make_evict_handler(self, index: int) -> Callable[[str, Buffer], None]:
        def handler(key: str, data: Buffer) -> None:
            tier = self.tiers[index]
            added: list[tuple[str, str, int]] = []
            if self.write_policy == "write-back":
                for lower in self.tiers[index + 1:]:
                    if lower.contains(key) or lower.put(key, data):
                        added.append((key, lower.kind, len(data)))
                        break
            self._emit(added, [(key, tier.kind)])
        return handler

    def _make_drop_handler(self, tier: Tier) -> Callable[[str], None]:
        def handler(key: str) -> None:
            self._count_bad()
            self._emit([], [(key, tier.kind)])
        return handler

    def _count_bad(self) -> None:
        self.dropped += 1
        if self.on_bad is not None:
            self.on_bad()

    def _self_verifying(self, tier: Tier) -> bool:
        """Whether ``tier`` verifies what it reads itself (the durable tiers do, on every get, with our keyring)."""
        return tier.durable and tier.keyring is self.keyring

    def _check(self, key: str, data: Buffer, *, full: bool) -> str:
        """'' when ``data`` is a good copy of ``key`` (header only unless ``full``), else why not."""
        try:
            verify_object(data, key=key, check_payload=full, keyring=self.keyring, **expected_fields(key))
        except CorruptObject as exc:
            return str(exc) or type(exc).__name__
        return ""

    def _drop_bad(self, tier: Tier, key: str, why: str) -> bool:
        log.warning("tier %s: dropping bad copy of %s: %s", tier.kind, key, why)
        if tier.delete(key):
            self._count_bad()
            self._emit([], [(key, tier.kind)])
            return True
        return False

    def scrub(self, keys: Sequence[str]) -> list[bool]:
        """Fully verify every tier's copy of each key (with the keyring when there is one) and drop the bad ones;
        per key True when a copy was dropped. For keys a client reported bad."""
        out = [False] * len(keys)
        for tier in self.tiers:
            held = [i for i, present in enumerate(tier.contains_many(keys)) if present]
            if not held:
                continue
            for i, data in zip(held, tier.get_many([keys[i] for i in held])):
                if data is None:  # a verifying tier dropped (and reported) it itself, or it went meanwhile
                    out[i] = out[i] or not tier.contains(keys[i])
                    continue
                why = self._check(keys[i], data, full=True)
                if why:
                    out[i] = self._drop_bad(tier, keys[i], why) or out[i]
        return out

    def tier(self, kind: str) -> Tier | None:
        return next((t for t in self.tiers if t.kind == kind), None)

    def put_many(self, items: Sequence[tuple[str, Buffer]], tier: str = "") -> list[bool]:
        """Store objects in the top tier (or in ``tier``, a placement hint) and, with write-through, in every
        durable tier below it; objects the first target cannot hold go to the next tier that can."""
        start = next((i for i, t in enumerate(self.tiers) if t.kind == tier), 0)
        targets = [self.tiers[start]]
        if self.write_policy == "write-through":
            targets += [t for t in self.tiers[start + 1:] if t.durable]
        stored = [False] * len(items)
        added: list[tuple[str, str, int]] = []
        for tier in targets:
            for i, ok in enumerate(tier.put_many(items)):
                if ok:
                    stored[i] = True
                    added.append((items[i][0], tier.kind, len(items[i][1])))
        if not stored or not all(stored):
            # The top tier could not take some objects (too large): try every lower tier in order.
            for i, ok in enumerate(stored):
                if ok:
                    continue
                for tier in self.tiers[1:]:
                    if tier not in targets and tier.put(*items[i]):
                        stored[i] = True
                        added.append((items[i][0], tier.kind, len(items[i][1])))
                        break
        self._emit(added, [])
        return stored

    def get_leased(self, keys: Sequence[str]) -> tuple[list[tuple[Buffer, str] | None], list]:
        """Like :meth:`get_many`, but objects of a host-memory pool tier on top come as zero-copy views, valid
        until every returned lease is released (the bulk channel sends straight from the tier's memory)."""
        out: list[tuple[Buffer, str] | None] = [None] * len(keys)
        leases: list = []
        top = self.tiers[0] if self.tiers else None
        if top is not None and hasattr(top, "lease_many"):
            for i, lease in enumerate(top.lease_many(keys)):
                if lease is None:
                    continue
                try:
                    view = lease.view()
                except Exception:  # noqa: BLE001 - e.g. a GPU pool: no host view, copy it out below
                    lease.release()
                    continue
                out[i] = (view, top.kind)
                leases.append(lease)
        rest = [i for i, item in enumerate(out) if item is None]
        if rest:
            for i, item in zip(rest, self.get_many([keys[i] for i in rest])):
                out[i] = item
        return out, leases

    def get_many(self, keys: Sequence[str]) -> list[tuple[Buffer, str] | None]:
        """Objects with the kind of the tier that served them; ``None`` for misses."""
        out: list[tuple[Buffer, str] | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        promote: list[tuple[str, Buffer]] = []
        for depth, tier in enumerate(self.tiers):
            if not pending:
                break
            found = tier.get_many([keys[i] for i in pending])
            check = not self._self_verifying(tier)
            still = []
            for i, data in zip(pending, found):
                if data is not None and check:
                    why = self._check(keys[i], data, full=False)
                    if why:
                        self._drop_bad(tier, keys[i], why)
                        data = None
                if data is None:
                    still.append(i)
                else:
                    out[i] = (data, tier.kind)
                    if depth > 0 and self.promote_on_hit:
                        promote.append((keys[i], data))
            pending = still
        if promote:
            top = self.tiers[0]
            added = [(k, top.kind, len(d)) for (k, d), ok in zip(promote, top.put_many(promote)) if ok]
            self._emit(added, [])
        return out

    def move_many(self, keys: Sequence[str], tier: str) -> list[bool]:
        """Make ``tier`` the fastest tier holding each key: copy the object there, drop copies in faster tiers."""
        index = next((i for i, t in enumerate(self.tiers) if t.kind == tier), None)
        if index is None:
            return [False] * len(keys)
        target = self.tiers[index]
        moved = [False] * len(keys)
        added: list[tuple[str, str, int]] = []
        removed: list[tuple[str, str]] = []
        for i, key in enumerate(keys):
            data = None
            if not target.contains(key):
                for other in self.tiers:
                    data = other.get(key)
                    if data is not None and not self._self_verifying(other):
                        why = self._check(key, data, full=False)
                        if why:
                            self._drop_bad(other, key, why)
                            data = None
                    if data is not None:
                        break
                if data is None or not target.put(key, data):
                    continue
                added.append((key, target.kind, len(data)))
            for faster in self.tiers[:index]:
                if faster.delete(key):
                    removed.append((key, faster.kind))
            moved[i] = True
        self._emit(added, removed)
        return moved

    def locate_many(self, keys: Sequence[str]) -> list[str]:
        """The kind of the fastest tier holding each key ('' when absent)."""
        out = [""] * len(keys)
        for tier in self.tiers:
            missing = [i for i, t in enumerate(out) if not t]
            if not missing:
                break
            for i, present in zip(missing, tier.contains_many([keys[i] for i in missing])):
                if present:
                    out[i] = tier.kind
        return out

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        deleted = [False] * len(keys)
        removed: list[tuple[str, str]] = []
        for tier in self.tiers:
            for i, ok in enumerate(tier.delete_many(keys)):
                if ok:
                    deleted[i] = True
                    removed.append((keys[i], tier.kind))
        self._emit([], removed)
        return deleted

    def inventory(self) -> list[tuple[str, str, int]]:
        """Every ``(key, tier, size)`` held, for a full report to the controller."""
        return [(key, tier.kind, size) for tier in self.tiers for key, size in tier.keys()]

    def close(self) -> None:
        for tier in self.tiers:
            try:
                tier.close()
            except Exception:  # noqa: BLE001
                log.exception("closing tier %s", tier.kind)
