"""The controller's calls to storage nodes: admin ``Delete`` and ``Move`` on the data plane's gRPC service.

Only keys and tier names cross; the controller never sends or receives chunk bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from kdn.v1 import data_pb2, data_pb2_grpc
from kdn.wire.auth import call_metadata
from kdn.wire.rpc import make_channel, raise_from_rpc

__all__ = ["NodeLink"]


class NodeLink:
    """One gRPC channel to a node, with the controller's admin token."""

    def __init__(self, address: str, *, token: str = "", tls: Any = None, timeout_s: float = 5.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = call_metadata(token, "default")
        self._channel = make_channel(address, tls)
        self._stub = data_pb2_grpc.DataStub(self._channel)

    def move_many(self, keys: Sequence[str], tier: str) -> list[bool]:
        """Make ``tier`` the fastest tier holding each key."""
        try:
            reply = self._stub.Move(data_pb2.MoveRequest(keys=list(keys), tier=tier), timeout=self.timeout_s,
                                    metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"move on {self.address}")
        return list(reply.moved)

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """Delete each key from every tier of the node."""
        try:
            reply = self._stub.Delete(data_pb2.KeysRequest(keys=list(keys)), timeout=self.timeout_s,
                                      metadata=self.metadata)
        except grpc.RpcError as exc:
            raise_from_rpc(exc, f"delete on {self.address}")
        return list(reply.deleted)

    def close(self) -> None:
        self._channel.close()
