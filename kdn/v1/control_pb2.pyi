from kdn.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.NodeInfo
    def __init__(self, node: _Optional[_Union[_common_pb2.NodeInfo, _Mapping]] = ...) -> None: ...

class RegisterNodeReply(_message.Message):
    __slots__ = ("heartbeat_interval_s", "placement_managed")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_MANAGED_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    placement_managed: bool
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., placement_managed: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "tiers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    tiers: _containers.RepeatedCompositeFieldContainer[_common_pb2.TierUsage]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[_common_pb2.TierUsage, _Mapping]]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "copies")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    known: bool
    copies: _containers.RepeatedCompositeFieldContainer[CopyOrder]
    def __init__(self, known: _Optional[bool] = ..., copies: _Optional[_Iterable[_Union[CopyOrder, _Mapping]]] = ...) -> None: ...

class CopyOrder(_message.Message):
    __slots__ = ("key", "node_id", "address", "tier")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    key: str
    node_id: str
    address: str
    tier: str
    def __init__(self, key: _Optional[str] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class InventoryEntry(_message.Message):
    __slots__ = ("key", "tier", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: str
    tier: str
    size: int
    def __init__(self, key: _Optional[str] = ..., tier: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class InventoryReport(_message.Message):
    __slots__ = ("node_id", "epoch", "full", "added", "removed")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    full: bool
    added: _containers.RepeatedCompositeFieldContainer[InventoryEntry]
    removed: _containers.RepeatedCompositeFieldContainer[InventoryEntry]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., full: _Optional[bool] = ..., added: _Optional[_Iterable[_Union[InventoryEntry, _Mapping]]] = ..., removed: _Optional[_Iterable[_Union[InventoryEntry, _Mapping]]] = ...) -> None: ...

class InventoryAck(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys", "prefix", "probe")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    prefix: bool
    probe: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., prefix: _Optional[bool] = ..., probe: _Optional[bool] = ...) -> None: ...

class KeyLocations(_message.Message):
    __slots__ = ("key", "locations")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    key: str
    locations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Location]
    def __init__(self, key: _Optional[str] = ..., locations: _Optional[_Iterable[_Union[_common_pb2.Location, _Mapping]]] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("results", "prefix_hits")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[KeyLocations]
    prefix_hits: int
    def __init__(self, results: _Optional[_Iterable[_Union[KeyLocations, _Mapping]]] = ..., prefix_hits: _Optional[int] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("keys", "sizes", "tokens", "starts", "model", "kv_bytes_per_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    starts: _containers.RepeatedScalarFieldContainer[int]
    model: str
    kv_bytes_per_token: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., sizes: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., starts: _Optional[_Iterable[int]] = ..., model: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ...) -> None: ...

class PlaceReply(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[_common_pb2.Location]
    def __init__(self, targets: _Optional[_Iterable[_Union[_common_pb2.Location, _Mapping]]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("keys", "prefix")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    def __init__(self, evicted: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class PinReply(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: int
    def __init__(self, changed: _Optional[int] = ...) -> None: ...

class ControllerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControllerStats(_message.Message):
    __slots__ = ("nodes", "alive_nodes", "keys", "bytes", "lookups", "lookup_keys", "lookup_hits", "pinned", "uptime_s")
    NODES_FIELD_NUMBER: _ClassVar[int]
    ALIVE_NODES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_KEYS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_HITS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    alive_nodes: int
    keys: int
    bytes: int
    lookups: int
    lookup_keys: int
    lookup_hits: int
    pinned: int
    uptime_s: float
    def __init__(self, nodes: _Optional[int] = ..., alive_nodes: _Optional[int] = ..., keys: _Optional[int] = ..., bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_keys: _Optional[int] = ..., lookup_hits: _Optional[int] = ..., pinned: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[_common_pb2.NodeInfo, _Mapping]]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("prefix", "limit")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    limit: int
    def __init__(self, prefix: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key", "locations", "pinned", "size", "lookups", "last_access_age_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCESS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    key: str
    locations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Location]
    pinned: bool
    size: int
    lookups: int
    last_access_age_s: float
    def __init__(self, key: _Optional[str] = ..., locations: _Optional[_Iterable[_Union[_common_pb2.Location, _Mapping]]] = ..., pinned: _Optional[bool] = ..., size: _Optional[int] = ..., lookups: _Optional[int] = ..., last_access_age_s: _Optional[float] = ...) -> None: ...

class ListKeysReply(_message.Message):
    __slots__ = ("keys", "truncated")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    truncated: bool
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class TierValue(_message.Message):
    __slots__ = ("node_id", "tier", "offer", "eligible", "reason", "load_s", "saving_per_reuse", "hold_per_hour", "value_per_hour", "current")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    SAVING_PER_REUSE_FIELD_NUMBER: _ClassVar[int]
    HOLD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    VALUE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tier: str
    offer: str
    eligible: bool
    reason: str
    load_s: float
    saving_per_reuse: float
    hold_per_hour: float
    value_per_hour: float
    current: bool
    def __init__(self, node_id: _Optional[str] = ..., tier: _Optional[str] = ..., offer: _Optional[str] = ..., eligible: _Optional[bool] = ..., reason: _Optional[str] = ..., load_s: _Optional[float] = ..., saving_per_reuse: _Optional[float] = ..., hold_per_hour: _Optional[float] = ..., value_per_hour: _Optional[float] = ..., current: _Optional[bool] = ...) -> None: ...

class KeyExplanation(_message.Message):
    __slots__ = ("key", "found", "policy", "size", "tokens", "prefill_seconds_saved", "prefill_basis", "reuse_per_hour", "lookups", "last_access_age_s", "pinned", "gpu", "gpu_price_per_hour", "choice", "action", "reason", "tiers")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_SAVED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BASIS_FIELD_NUMBER: _ClassVar[int]
    REUSE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCESS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_PRICE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    key: str
    found: bool
    policy: str
    size: int
    tokens: int
    prefill_seconds_saved: float
    prefill_basis: str
    reuse_per_hour: float
    lookups: int
    last_access_age_s: float
    pinned: bool
    gpu: str
    gpu_price_per_hour: float
    choice: str
    action: str
    reason: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierValue]
    def __init__(self, key: _Optional[str] = ..., found: _Optional[bool] = ..., policy: _Optional[str] = ..., size: _Optional[int] = ..., tokens: _Optional[int] = ..., prefill_seconds_saved: _Optional[float] = ..., prefill_basis: _Optional[str] = ..., reuse_per_hour: _Optional[float] = ..., lookups: _Optional[int] = ..., last_access_age_s: _Optional[float] = ..., pinned: _Optional[bool] = ..., gpu: _Optional[str] = ..., gpu_price_per_hour: _Optional[float] = ..., choice: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierValue, _Mapping]]] = ...) -> None: ...

class ExplainReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyExplanation]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyExplanation, _Mapping]]] = ...) -> None: ...

class PutProfileRequest(_message.Message):
    __slots__ = ("profile", "fingerprints")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    profile: bytes
    fingerprints: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, profile: _Optional[bytes] = ..., fingerprints: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PutProfileReply(_message.Message):
    __slots__ = ("profile_id",)
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    profile_id: bytes
    def __init__(self, profile_id: _Optional[bytes] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("profile_id", "fingerprint", "have_id")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HAVE_ID_FIELD_NUMBER: _ClassVar[int]
    profile_id: bytes
    fingerprint: bytes
    have_id: bytes
    def __init__(self, profile_id: _Optional[bytes] = ..., fingerprint: _Optional[bytes] = ..., have_id: _Optional[bytes] = ...) -> None: ...

class GetProfileReply(_message.Message):
    __slots__ = ("found", "profile_id", "profile")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    profile_id: bytes
    profile: bytes
    def __init__(self, found: _Optional[bool] = ..., profile_id: _Optional[bytes] = ..., profile: _Optional[bytes] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "undo")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    undo: bool
    def __init__(self, node_id: _Optional[str] = ..., undo: _Optional[bool] = ...) -> None: ...

class DrainNodeReply(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.NodeInfo
    def __init__(self, node: _Optional[_Union[_common_pb2.NodeInfo, _Mapping]] = ...) -> None: ...

class RemoveNodeRequest(_message.Message):
    __slots__ = ("node_id", "force")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    force: bool
    def __init__(self, node_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveNodeReply(_message.Message):
    __slots__ = ("locations", "lost")
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    locations: int
    lost: int
    def __init__(self, locations: _Optional[int] = ..., lost: _Optional[int] = ...) -> None: ...
