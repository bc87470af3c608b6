"""Bounds on the bytes a node holds for puts still arriving (docs/security.md, "Bounds").

A put's declared size never drives an allocation: :func:`receive_growing` allocates as bytes arrive (a small first
buffer, then doubling, never past the declared size), and every allocation is charged to an
:class:`InflightBudget` first: per tenant and for the whole node. A charge that does not fit is refused at once
(:class:`~kdn.errors.CapacityError` with a clear message), never waited for, so a tenant that declares huge
objects on many connections gets refusals instead of the node's memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kdn.errors import CapacityError
from kdn.wire.buffers import fresh_bytes

__all__ = ["InflightBudget", "Reservation", "receive_growing", "FIRST_ALLOCATION"]

FIRST_ALLOCATION = 1 << 20
"""Bytes allocated for an object before any of its bytes arrive (at most; less when it is smaller)."""


class InflightBudget:
    """Bytes received for puts and not yet handed to the tiers: per tenant and in total. Thread-safe."""

    def __init__(self, tenant_bytes: int, total_bytes: int) -> None:
        self.tenant_bytes = int(tenant_bytes)
        self.total_bytes = int(total_bytes)
        self._used: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def used(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._total if tenant is None else self._used.get(tenant, 0)

    def charge(self, tenant: str, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``tenant`` or raise :class:`CapacityError` (nothing reserved)."""
        if nbytes <= 0:
            return
        with self._lock:
            mine = self._used.get(tenant, 0)
            if mine + nbytes > self.tenant_bytes:
                raise CapacityError(f"tenant {tenant!r} has {mine} put bytes in flight on this node; {nbytes} more "
                                    f"would pass its limit of {self.tenant_bytes} (retry when its puts finish)")
            if self._total + nbytes > self.total_bytes:
                raise CapacityError(f"the node has {self._total} put bytes in flight; {nbytes} more would pass its "
                                    f"limit of {self.total_bytes} (retry later)")
            self._used[tenant] = mine + nbytes
            self._total += nbytes

    def release(self, tenant: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            left = self._used.get(tenant, 0) - nbytes
            if left > 0:
                self._used[tenant] = left
            else:
                self._used.pop(tenant, None)
            self._total = max(0, self._total - nbytes)

    def reservation(self, tenant: str) -> Reservation:
        return Reservation(self, tenant)


@dataclass
class Reservation:
    """What one connection or stream holds of a budget; ``release()`` gives it all back."""

    budget: InflightBudget | None
    tenant: str
    held: int = field(default=0)

    def charge(self, nbytes: int) -> None:
        if self.budget is not None:
            self.budget.charge(self.tenant, nbytes)
        self.held += nbytes

    def release(self, nbytes: int | None = None) -> None:
        n = self.held if nbytes is None else min(nbytes, self.held)
        if self.budget is not None:
            self.budget.release(self.tenant, n)
        self.held -= n


def receive_growing(size: int, fill: Callable[[memoryview], None], reservation: Reservation,
                    first: int = FIRST_ALLOCATION) -> memoryview:
    """Receive an object of declared ``size``: ``fill(view)`` must fill the whole view with the next bytes.

    One buffer of ``size`` bytes is reserved in address space only (:func:`~kdn.wire.buffers.fresh_bytes`: its
    pages are committed as bytes are written, never zero-filled), and filled in steps of ``min(size, first)``
    bytes, then doubling; each step is charged to ``reservation`` before its bytes are read
    (:class:`CapacityError` when it does not fit: the caller drains or closes). So memory follows the bytes that
    arrived, not the declared size."""
    buf = fresh_bytes(size)
    filled, step = 0, max(1, min(size, first))
    while filled < size:
        step = min(size - filled, step)
        reservation.charge(step)
        fill(buf[filled:filled + step])
        filled += step
        step *= 2
    return buf
