"""The tier interface: one storage medium holding immutable chunk objects by key string.

Contract for every tier:
- Keys are chunk key strings (``str(ChunkKey)``); values are complete chunk objects (bytes-like). Objects are
  immutable: ``put`` of a key that is present is a no-op that reports success (first writer wins).
- All methods are batch methods and thread-safe. A batch never fails as a whole because one item fails:
  ``put_many`` reports per item, ``get_many`` returns ``None`` for each miss.
- ``get_many`` returns bytes-like objects the caller may read until it drops them; tiers must never hand out a
  buffer that a later put or eviction can overwrite while the caller holds it.
- A tier never returns an object that it cannot vouch for: durable tiers verify every object they read (header,
  section checksums, and with the node's ``keyring`` — which the tier stack hands them — the header MAC and keyed
  section digests) and treat failures as misses, dropping the bad object with a logged warning and a call of
  ``on_drop(key)``: the stores behind them (Redis, S3, a directory) are not trusted with integrity.
- Backend outages (disk I/O errors, Redis/S3 down) become misses (``get``), ``False`` (``put``/``contains``) and a
  logged error; they never raise into the caller.
- ``put_many`` may evict least-recently-used objects to make room; each evicted object is passed to the
  ``on_evict`` callback (key, data) so that the node can demote it to a lower tier or report its removal.
- ``capacity_bytes`` and ``used_bytes`` count object bytes; ``used_bytes <= capacity_bytes`` always holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from kdn.wire.buffers import Buffer

if TYPE_CHECKING:
    from kdn.format.mac import Keyring

__all__ = ["Tier", "Buffer", "EvictCallback", "DropCallback"]

EvictCallback = Callable[[str, Buffer], None]
DropCallback = Callable[[str], None]


class Tier(ABC):
    """A bounded store of chunk objects."""

    #: Short kind name used in configs, metrics and the controller's index ("memory", "disk", ...).
    kind: str = ""
    #: True when objects survive a restart of the process.
    durable: bool = False
    #: The node's MAC keyring; durable tiers authenticate what they read with it (None: checksums only).
    keyring: Keyring | None = None

    def __init__(self) -> None:
        self.on_evict: EvictCallback | None = None
        #: Called with the key of an object the tier dropped on its own (it failed verification), so that the
        #: node tells the controller (docs/security.md, "Healing").
        self.on_drop: DropCallback | None = None

    @abstractmethod
    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        """Store objects; per item True when the object is now held (already present counts)."""

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        """Fetch objects; ``None`` for each miss."""

    @abstractmethod
    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is held."""

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """Remove objects; per key True when it was held."""

    @abstractmethod
    def keys(self) -> Iterator[tuple[str, int]]:
        """Every held key with its object size (a snapshot; for inventory reports)."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """The most object bytes this tier holds."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Object bytes held now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the tier is unusable afterwards."""

    def available(self) -> bool:
        """Whether the backend can serve now (node readiness, :mod:`kdn.node.health`); may wait up to the
        backend's timeout, never raises. Local memory tiers are always available."""
        return True

    # Convenience single-item forms.
    def put(self, key: str, data: Buffer) -> bool:
        return self.put_many([(key, data)])[0]

    def get(self, key: str) -> Buffer | None:
        return self.get_many([key])[0]

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def delete(self, key: str) -> bool:
        return self.delete_many([key])[0]

    def _evicted(self, key: str, data: Buffer) -> None:
        if self.on_evict is not None:
            self.on_evict(key, data)

    def _dropped(self, key: str) -> None:
        if self.on_drop is not None:
            self.on_drop(key)
