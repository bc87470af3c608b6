"""The control-plane transport: the controller's RPCs called by name with keyword fields.

``ControlClient("127.0.0.1:7070").call("Lookup", keys=[...], prefix=True)`` builds the request message from the
service descriptor, attaches the token and tenant, applies the deadline and maps gRPC errors onto KDN's tree.
It is the only place outside the servicers where the client side touches the generated stubs (``kdn.v1``); the
client library and ``kdnctl`` both use it.
"""

from __future__ import annotations

from typing import Any

import grpc

from kdn.errors import InvalidRequest, Unavailable
from kdn.v1 import control_pb2, control_pb2_grpc
from kdn.wire.auth import call_metadata
from kdn.wire.rpc import make_channel, raise_from_rpc

__all__ = ["ControlClient"]

_METHODS = control_pb2.DESCRIPTOR.services_by_name["Control"].methods_by_name


class ControlClient:
    """One channel to the controller (``address`` empty: every call raises :class:`Unavailable`)."""

    def __init__(self, address: str, *, tls: Any = None, token: str = "", tenant: str = "",
                 timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = call_metadata(token, tenant)
        self._channel = make_channel(address, tls) if address else None
        self._stub = control_pb2_grpc.ControlStub(self._channel) if self._channel else None

    def call(self, method: str, **fields: Any) -> Any:
        """Call ``method`` with a request built from ``fields``; returns the reply message."""
        if method not in _METHODS:
            raise InvalidRequest(f"unknown controller method {method!r}")
        if self._stub is None:
            raise Unavailable("no controller configured")
        request = getattr(control_pb2, _METHODS[method].input_type.name)(**fields)
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"{method} on controller {self.address}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
