"""A storage node's gRPC health service (``grpc.health.v1.Health``): liveness and readiness.

- ``""`` is SERVING while the process runs (liveness; NOT_SERVING once it shuts down).
- ``kdn.v1.Data`` (:data:`HEALTH_SERVICE`) is SERVING only while every tier is available
  (:meth:`kdn.node.tiers.base.Tier.available`: Redis answers PING, the S3 bucket answers HEAD, the disk tier's
  filesystem is writable and not full) and, when the node has a controller, the controller in use knows the node
  (it registered and the last call succeeded). Anything else is NOT_SERVING (readiness).

A background thread re-checks every ``period_s`` (a remote tier's check waits at most its socket timeout, so the
answer to a probe never waits on a backend) and logs every change with the reasons.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

from kdn.node.tiers.base import Tier

__all__ = ["HEALTH_SERVICE", "NodeHealth"]

log = logging.getLogger(__name__)

#: Name of the data service in the gRPC health service (readiness).
HEALTH_SERVICE = "kdn.v1.Data"


class NodeHealth:
    """Keeps ``servicer`` (a ``grpc_health`` HealthServicer) in step with the node's tiers and registration."""

    def __init__(self, tiers: Sequence[Tier], registered: Callable[[], bool] | None, period_s: float = 1.0) -> None:
        self.tiers = list(tiers)
        self.registered = registered
        self.period_s = period_s
        self.servicer = health.HealthServicer()
        self.problems: list[str] = ["starting"]
        """Why the node is not ready (empty: ready)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdn-node-health", daemon=True)
        self.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def ready(self) -> bool:
        return not self.problems

    def start(self) -> NodeHealth:
        self.check()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.servicer.enter_graceful_shutdown()  # every service NOT_SERVING from now on
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> list[str]:
        """Check every tier and the registration now; update the health service; returns the problems."""
        problems = []
        for tier in self.tiers:
            try:
                up = tier.available()
            except Exception as exc:  # noqa: BLE001 - a failing check is a tier that is down, never a crash
                log.debug("tier %s availability check failed: %s", tier.kind, exc)
                up = False
            if not up:
                problems.append(f"tier {tier.kind} unavailable")
        if self.registered is not None and not self.registered():
            problems.append("not registered with a controller")
        if problems != self.problems and not self._stop.is_set():
            if problems:
                log.warning("node not ready: %s", "; ".join(problems))
            else:
                log.info("node ready: every tier available%s",
                         ", registered" if self.registered is not None else "")
            self.servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING if problems
                              else health_pb2.HealthCheckResponse.SERVING)
        self.problems = problems
        return problems

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.check()
