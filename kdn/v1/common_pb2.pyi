from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TierUsage(_message.Message):
    __slots__ = ("kind", "capacity_bytes", "used_bytes", "objects")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    capacity_bytes: int
    used_bytes: int
    objects: int
    def __init__(self, kind: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., objects: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "bulk_address", "epoch", "tiers", "alive", "heartbeat_age_s", "objects", "draining", "drain_pending")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BULK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DRAIN_PENDING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    bulk_address: str
    epoch: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierUsage]
    alive: bool
    heartbeat_age_s: float
    objects: int
    draining: bool
    drain_pending: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., bulk_address: _Optional[str] = ..., epoch: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierUsage, _Mapping]]] = ..., alive: _Optional[bool] = ..., heartbeat_age_s: _Optional[float] = ..., objects: _Optional[int] = ..., draining: _Optional[bool] = ..., drain_pending: _Optional[int] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("node_id", "address", "bulk_address", "tier", "size")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BULK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    bulk_address: str
    tier: str
    size: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., bulk_address: _Optional[str] = ..., tier: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...
