"""The control-plane transport: the controller's RPCs called by name with keyword fields.

``ControlClient("127.0.0.1:7070").call("Lookup", keys=[...], prefix=True)`` builds the request message from the
service descriptor, attaches the token and tenant, applies the deadline and maps gRPC errors onto KDN's tree.
It is the only place outside the servicers where the client side touches the generated stubs (``kdn.v1``); the
client library and ``kdnctl`` both use it.

Replicas: ``address`` may list several controllers (``"a:7070,b:7070"``). A call that finds one unreachable or a
standby (UNAVAILABLE) is retried at once on the next, each address at most once per call; the one that answered
is tried first next time.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from kdn.errors import InvalidRequest, Unavailable
from kdn.v1 import control_pb2, control_pb2_grpc
from kdn.wire.auth import call_metadata
from kdn.wire.rpc import make_channel, raise_from_rpc

__all__ = ["ControlClient", "split_addresses"]

log = logging.getLogger(__name__)

_METHODS = control_pb2.DESCRIPTOR.services_by_name["Control"].methods_by_name


def split_addresses(address: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a:1, b:2"`` (or a list) -> ``["a:1", "b:2"]``."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    return [p.strip() for p in parts if p and p.strip()]


class ControlClient:
    """Channels to the controller replicas (``address`` empty: every call raises :class:`Unavailable`)."""

    def __init__(self, address: str | list[str], *, tls: Any = None, token: str = "", tenant: str = "",
                 timeout_s: float = 10.0) -> None:
        self.addresses = split_addresses(address)
        self.address = ",".join(self.addresses)
        self.timeout_s = timeout_s
        self.metadata = call_metadata(token, tenant)
        self._channels = [make_channel(a, tls) for a in self.addresses]
        self._stubs = [control_pb2_grpc.ControlStub(c) for c in self._channels]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        """The address tried first (the last one that answered)."""
        return self.addresses[self._current] if self.addresses else ""

    def call(self, method: str, **fields: Any) -> Any:
        """Call ``method`` with a request built from ``fields``; returns the reply message."""
        if method not in _METHODS:
            raise InvalidRequest(f"unknown controller method {method!r}")
        if not self._stubs:
            raise Unavailable("no controller configured")
        request = getattr(control_pb2, _METHODS[method].input_type.name)(**fields)
        first = self._current
        count = len(self._stubs)
        for step in range(count):
            i = (first + step) % count
            try:
                reply = getattr(self._stubs[i], method)(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and step + 1 < count:
                    log.debug("controller %s unavailable for %s: trying the next", self.addresses[i], method)
                    continue
                raise_from_rpc(exc, f"{method} on controller {self.addresses[i]}")
            if i != self._current:
                with self._lock:
                    self._current = i
                log.info("controller calls now go to %s", self.addresses[i])
            return reply
        raise Unavailable(f"{method}: no controller answered")  # unreachable: the last attempt raises

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
