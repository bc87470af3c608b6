"""Keep grpc's own logging from being a log flood anyone can cause.

grpcio logs every request it cannot deserialize (``Exception deserializing message!``) at ERROR with a traceback,
before any KDN code runs — so before authentication: any peer that can reach a port can fill the logs. The filter
below drops those records and reports them once a minute as one WARNING line with a count and the last error's
type (no traceback). The caller still gets its INTERNAL status from grpc.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["quiet_malformed_messages", "MalformedMessageFilter"]

_MESSAGES = ("Exception deserializing message!", "Exception deserializing request!")
_installed = threading.Lock()
_filter: MalformedMessageFilter | None = None


class MalformedMessageFilter(logging.Filter):
    """Drops grpc's per-message deserialization tracebacks; one WARNING summary per ``interval_s``."""

    def __init__(self, interval_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.total = 0
        self._pending = 0
        self._last_report = -float("inf")
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() not in _MESSAGES:
            return True
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else "error"
        now = self.clock()
        with self._lock:
            self.total += 1
            self._pending += 1
            if now - self._last_report < self.interval_s:
                return False
            count, self._pending, self._last_report = self._pending, 0, now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused %d malformed gRPC message(s) since the last report (last: %s)", (count, kind)
        record.exc_info = record.exc_text = None
        return True


def quiet_malformed_messages() -> MalformedMessageFilter:
    """Install the filter on grpc's loggers (once per process); returns it."""
    global _filter
    with _installed:
        if _filter is None:
            _filter = MalformedMessageFilter()
            for name in ("grpc._common", "grpc._server"):
                logging.getLogger(name).addFilter(_filter)
        return _filter
