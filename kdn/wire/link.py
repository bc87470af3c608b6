"""Link emulation for benchmarks: a token bucket that paces a sender to a fixed bit rate.

One :class:`TokenBucket` is shared by every connection of a node's bulk channel (they share one emulated link).
Senders ask for permission per slice (``take(n)``) and sleep off the debt; the bucket holds at most ``burst``
bytes of credit, so an idle link cannot save up more than a short burst.
"""

from __future__ import annotations

import threading
import time

__all__ = ["TokenBucket", "PACE_SLICE_BYTES"]

PACE_SLICE_BYTES = 256 << 10
"""Largest send a paced connection makes at once (the pacing granularity)."""

BURST_S = 0.01
"""Default credit an idle link keeps, in seconds of its rate (capped at 1 MiB)."""


class TokenBucket:
    """Paces callers to ``gbps`` Gbit/s in total; thread-safe."""

    def __init__(self, gbps: float, burst_bytes: int | None = None) -> None:
        if gbps <= 0:
            raise ValueError(f"link speed must be positive, got {gbps} Gbit/s")
        self.rate = gbps * 1e9 / 8  # bytes per second
        if burst_bytes is None:  # 10 ms of the link, at most 1 MiB: a slow link never sends a small prefix at once
            burst_bytes = min(1 << 20, max(1 << 12, int(self.rate * BURST_S)))
        self.burst = float(burst_bytes)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> float:
        """Consume ``nbytes`` of credit, sleeping while the link is in debt; returns the seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - nbytes
            self._last = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait
