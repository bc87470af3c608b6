from kdn.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutFrame(_message.Message):
    __slots__ = ("key", "total_size", "offset", "data", "tier")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    key: str
    total_size: int
    offset: int
    data: bytes
    tier: str
    def __init__(self, key: _Optional[str] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., tier: _Optional[str] = ...) -> None: ...

class PutResult(_message.Message):
    __slots__ = ("key", "stored", "error")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    key: str
    stored: bool
    error: str
    def __init__(self, key: _Optional[str] = ..., stored: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "max_frame_bytes")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    max_frame_bytes: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., max_frame_bytes: _Optional[int] = ...) -> None: ...

class GetFrame(_message.Message):
    __slots__ = ("index", "found", "total_size", "offset", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    found: bool
    total_size: int
    offset: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., found: _Optional[bool] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ContainsReply(_message.Message):
    __slots__ = ("present", "tier")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    tier: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, present: _Optional[_Iterable[bool]] = ..., tier: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, deleted: _Optional[_Iterable[bool]] = ...) -> None: ...

class ReportBadReply(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, dropped: _Optional[_Iterable[bool]] = ...) -> None: ...

class NodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node", "gets", "get_hits", "puts", "bytes_out", "bytes_in", "corrupt_dropped", "controller_connected", "uptime_s")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    GET_HITS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_DROPPED_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.NodeInfo
    gets: int
    get_hits: int
    puts: int
    bytes_out: int
    bytes_in: int
    corrupt_dropped: int
    controller_connected: bool
    uptime_s: float
    def __init__(self, node: _Optional[_Union[_common_pb2.NodeInfo, _Mapping]] = ..., gets: _Optional[int] = ..., get_hits: _Optional[int] = ..., puts: _Optional[int] = ..., bytes_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., corrupt_dropped: _Optional[int] = ..., controller_connected: _Optional[bool] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("keys", "tier")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    tier: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., tier: _Optional[str] = ...) -> None: ...

class MoveReply(_message.Message):
    __slots__ = ("moved",)
    MOVED_FIELD_NUMBER: _ClassVar[int]
    moved: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, moved: _Optional[_Iterable[bool]] = ...) -> None: ...
