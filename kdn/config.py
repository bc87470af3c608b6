"""KDN's one typed configuration.

Precedence, lowest to highest: built-in defaults < YAML file (``--config PATH`` or ``$KDN_CONFIG``) <
environment variables ``KDN_<SECTION>__<FIELD>`` (e.g. ``KDN_NODE__PORT=7100``, ``KDN_CLIENT__TENANT=acme``) <
command-line flags (dedicated flags such as ``--port``, and ``--set section.field=value`` for any field).

Sizes accept ``1048576``, ``"512MiB"``, ``"4GiB"``, ``"10GB"``. Tiers are a list of ``{kind: ..., <fields>}``
validated against the tier's own config dataclass (see ``kdn.node.tiers``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdn.errors import ConfigError

__all__ = [
    "KDNConfig", "ControllerConfig", "PlacementConfig", "NodeConfig", "ClientConfig", "AuthConfig", "TenantQuota",
    "TierSpec", "SecurityConfig",
    "parse_size", "load_config", "default_data_dir",
]

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | float | str) -> int:
    """Parse a byte size: an int, or a string like ``"512MiB"``, ``"4GiB"``, ``"1.5GB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid size {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"size must not be negative: {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"invalid size {value!r}; use e.g. 1048576, 512MiB, 4GiB, 10GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "kdn")


@dataclass
class TierSpec:
    """One tier of a node: its kind and its validated, kind-specific config dataclass."""

    kind: str
    config: Any

    @classmethod
    def parse(cls, raw: Any) -> TierSpec:
        if isinstance(raw, TierSpec):
            return raw
        if not isinstance(raw, dict) or "kind" not in raw:
            raise ConfigError(f"a tier must be a mapping with a 'kind', got {raw!r}")
        fields = dict(raw)
        kind = fields.pop("kind")
        # Tier kinds are a plugin registry owned by the node (``kdn.node.tiers``); it is looked up by name at run
        # time so that the configuration, which every side loads, does not depend on the node's code.
        config_cls = importlib.import_module("kdn.node.tiers").tier_class(kind).config_class
        return cls(kind, _build(config_cls, fields, f"tier {kind}"))


@dataclass
class TenantQuota:
    """Limits of one tenant (0 or absent: unlimited)."""

    pins: int = 0
    """Keys the tenant may have pinned at once (``Pin`` beyond it fails with RESOURCE_EXHAUSTED)."""
    bytes: dict[str, Any] = field(default_factory=dict)
    """Tier kind -> bytes of the tenant's objects that one node keeps in that tier, e.g. ``{memory: 1GiB}``.
    Puts go to the next tier with room under the quota; moves into a full tier are refused."""
    requests_per_s: float = 0.0
    """Calls per second per process (token bucket, bursts of one second's worth)."""

    def validate(self) -> None:
        self.bytes = {str(k): parse_size(v) for k, v in self.bytes.items()}
        if self.pins < 0 or self.requests_per_s < 0:
            raise ConfigError("auth.quotas: pins and requests_per_s must be >= 0")


@dataclass
class AuthConfig:
    """Bearer tokens, roles and quotas (docs/security.md). No tokens: open mode, allowed on loopback only."""

    tokens: dict[str, str] = field(default_factory=dict, repr=False)
    """Map of token -> tenant name, ``@node`` (storage nodes; ``@node:<node_id>`` binds it to one node) or
    ``@admin`` (operators, the controller). A key may be ``sha256:<hex>`` of the token instead of the token.
    When set, every RPC needs a token and the tenant comes from it."""
    tokens_file: str = ""
    """YAML file with more ``token: role`` entries (merged into ``tokens``); keeps tokens out of the config."""
    admin_token: str = field(default="", repr=False)
    """Token the controller presents to nodes for placement moves and evictions (must map to ``@admin``);
    "" = the first ``@admin`` token given in plain in ``tokens``."""
    admin_token_file: str = ""
    """File holding ``admin_token``."""
    insecure: bool = False
    """Allow serving without tokens on a non-loopback address (``--insecure``); logs a warning every minute."""
    quotas: dict[str, TenantQuota] = field(default_factory=dict)
    """Tenant -> limits, e.g. ``{acme: {pins: 1000, bytes: {memory: 4GiB}, requests_per_s: 500}}``."""


@dataclass
class SecurityConfig:
    """Object authentication (docs/security.md, "Integrity and forgery"); ``kdn.format.mac.load_keyring`` reads it.

    No keys (the default): objects carry checksums only. With keys, this process signs the objects it builds and
    treats unsigned, unknown-key or badly signed objects as misses. ``$KDN_MAC_KEYS_FILE`` overrides
    ``mac_keys_file``; ``$KDN_MAC_KEY`` (``key_id:secret``) adds a key. Secrets live only in files or the
    environment, never in this config.
    """

    mac_keys_file: str = ""
    """File of ``key_id: secret`` lines (master secrets of >= 32 characters, e.g. ``openssl rand -hex 32``: nodes and
    operators) or of ``key_id@tenant: hex`` lines (one tenant's derived keys, ``kdnctl derive-key``: its engines)."""
    mac_active_key: str = ""
    """Key id that signs ("" = the last key of the file, or the ``$KDN_MAC_KEY`` one)."""


@dataclass
class TLSConfig:
    """TLS on both planes (gRPC and the bulk channel). Off while ``cert`` and ``ca`` are empty.

    Servers (controller, node) present ``cert``/``key``; clients check the server against ``ca`` and, for mutual
    TLS, present ``cert``/``key`` too. With ``client_auth`` servers require a client certificate signed by ``ca``.
    """

    cert: str = ""
    """PEM certificate chain of this process."""
    key: str = ""
    """PEM private key of ``cert``."""
    ca: str = ""
    """PEM CA bundle that peers' certificates must chain to."""
    client_auth: bool = False
    """Servers: require and verify client certificates (mutual TLS)."""
    server_name: str = ""
    """Clients: the name expected in server certificates when it is not the host of the address."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("tls: cert and key must be given together")
        if self.client_auth and not self.ca:
            raise ConfigError("tls: client_auth needs ca (the CA that signs client certificates)")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(f"tls.{name}: no such file: {path}")


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 7070
    """gRPC port of the control plane (0 picks a free port)."""
    node_timeout_s: float = 10.0
    """A node that has not sent a heartbeat for this long is marked dead and its index entries are ignored."""
    redis: str = ""
    """Replicas (docs/operations.md): a Redis URL (``redis://host:6379/0``) shared by every controller replica.
    One replica at a time holds the lease and serves; the others answer UNAVAILABLE (clients and nodes move on to
    the next address) until the lease is free. Pins and key statistics live in Redis. Empty: one controller."""
    lease_ttl_s: float = 1.0
    """Lease lifetime in Redis; a killed active replica is replaced after at most this long."""
    advertise: str = ""
    """Address of this replica as clients reach it (shown by standbys; default ``host:port``)."""
    health_port: int = -1
    """A plaintext port serving only the gRPC health service (for kubelet gRPC probes, which cannot speak TLS);
    -1 = off (the health service is always on the main port too)."""


#: How node tier kinds are priced: node tier kind -> catalog tier (``costmodel/prices.yaml``).
DEFAULT_TIER_OFFERS: dict[str, str] = {"gpu": "gpu", "pinned": "cpu", "memory": "cpu", "disk": "disk",
                                       "redis": "redis", "s3": "s3"}
PLACEMENT_POLICIES = ("cost", "hash")


@dataclass
class PlacementConfig:
    """Where the controller puts chunks and when it moves them (docs/costmodel.md, "Placement in the controller")."""

    policy: str = "cost"
    """``cost``: node by rendezvous hashing, tier by the cost model, plus the periodic pass (promote, demote,
    evict); ``hash``: rendezvous hashing only, tiers left to each node's write policy and LRU."""
    interval_s: float = 5.0
    """Seconds between periodic passes over the index (``cost`` only); 0 disables the pass."""
    gpu: str = ""
    """Catalog GPU whose price and speed value a hit ("" = the catalog's default, h100)."""
    model: str = "llama-3-8b"
    """Catalog model for chunks whose model is not in the catalog: prefill time is this model's, scaled by the
    ratio of KV bytes per token."""
    prices: str = ""
    """A price YAML merged over the built-in catalog ("" = built-in only)."""
    price_overrides: list[str] = field(default_factory=list)
    """``SECTION.NAME.FIELD=VALUE`` overrides of the catalog, e.g. ``tiers.disk.bandwidth_gbps=6``."""
    network: str = ""
    """Network profile whose fees apply to remote tiers (redis, s3); "" = the catalog's default (same-zone)."""
    tier_offers: dict[str, str] = field(default_factory=dict)
    """Extra or changed node-tier-kind -> catalog-tier mappings, merged over the defaults
    (memory/pinned -> cpu, disk -> disk, redis -> redis, s3 -> s3, gpu -> gpu)."""
    tier_levels: dict[str, list[str]] = field(default_factory=dict)
    """Node tier kind -> the codec levels placement may put there (``fnmatch`` patterns), e.g.
    ``{s3: ["cachegen-compact"], redis: ["cachegen-*"]}``: slow or remote tiers keep only compact levels and a
    raw copy under pressure is evicted rather than demoted there. Kinds not listed take every level."""
    half_life_s: float = 3600.0
    """Half-life of a chunk's decayed access rate."""
    load_stall: float = 1.0
    """Fraction of a load the GPU waits for, charged at the GPU price (0: loads fully overlap compute)."""
    max_load_s: float = 0.0
    """Latency need: tiers that cannot deliver a chunk within this are not used (0: only beat recomputing)."""
    min_value_per_hour: float = 0.0
    """A tier must earn more than this ($/h per chunk) to be chosen."""
    hysteresis: float = 0.1
    """Against flapping: move a chunk only when its reuse rate is this fraction past the rate at which its
    current tier and the better one are worth the same (its gain exceeds this fraction of the change in hold cost)."""
    high_watermark: float = 0.95
    """A tier filled beyond this fraction is under pressure: the pass demotes or evicts its lowest-value chunks."""
    low_watermark: float = 0.9
    """...until it is filled to this fraction; promotions fill a tier only up to it."""
    evict_below_break_even: bool = False
    """Also evict chunks not worth keeping in any tier when there is room. Off: such chunks are only the first
    to go under capacity pressure, so a store is never deleted by the pass while there is plenty of room."""
    max_moves_per_pass: int = 10_000
    """Upper bound on moves and evictions one pass issues."""

    def validate(self) -> None:
        if self.policy not in PLACEMENT_POLICIES:
            raise ConfigError(f"placement.policy must be one of {PLACEMENT_POLICIES}, got {self.policy!r}")
        if self.interval_s < 0 or self.half_life_s <= 0:
            raise ConfigError("placement.interval_s must be >= 0 and placement.half_life_s > 0")
        if not 0 <= self.load_stall <= 1:
            raise ConfigError(f"placement.load_stall must be in [0, 1], got {self.load_stall}")
        if self.max_load_s < 0 or self.hysteresis < 0 or self.max_moves_per_pass < 0:
            raise ConfigError("placement.max_load_s, hysteresis and max_moves_per_pass must be >= 0")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError("placement watermarks need 0 < low_watermark <= high_watermark <= 1")

    def offer_map(self) -> dict[str, str]:
        """Node tier kind -> catalog tier name (defaults merged with ``tier_offers``)."""
        return {**DEFAULT_TIER_OFFERS, **self.tier_offers}


@dataclass
class NodeConfig:
    node_id: str = ""
    """Stable node name; defaults to ``<hostname>:<port>``."""
    host: str = "127.0.0.1"
    port: int = 7071
    """gRPC port of the data plane (0 picks a free port)."""
    bulk_port: int = 7072
    """Port of the bulk byte channel (0 picks a free port, -1 disables it)."""
    advertise_host: str = ""
    """Host name clients use to reach this node (defaults to ``host``)."""
    advertise_bulk_port: int = 0
    """Port clients use to reach the bulk channel when it differs from the bound one (a proxy, a Kubernetes
    Service); 0 = the bound port."""
    controller: str = "127.0.0.1:7070"
    """Controller address; empty runs the node standalone."""
    token: str = field(default="", repr=False)
    """Token the node presents to the controller (maps to ``@node`` when auth tokens are configured)."""
    token_file: str = ""
    """File holding ``token`` (e.g. a mounted secret)."""
    heartbeat_interval_s: float = 2.0
    max_object_bytes: int = 1 << 30
    """Objects larger than this are refused."""
    tenant_inflight_bytes: int = 2 << 30
    """Put bytes one tenant may have in flight on this node (received, not yet stored), over all its bulk
    connections and gRPC streams; more is refused at once (docs/security.md, "Bounds")."""
    max_inflight_bytes: int = 8 << 30
    """Put bytes in flight on this node over all tenants."""
    write_policy: str = "write-through"
    """``write-through`` (puts also go to every durable tier) or ``write-back`` (demote on eviction)."""
    shared_memory: bool = True
    """Keep the ``memory`` tier in a shared-memory arena that clients on this host (same user) map and read in
    place (``docs/protocol.md``, "Shared memory"); off: a private memory tier."""
    health_port: int = -1
    """A plaintext port serving only the gRPC health service (kubelet gRPC probes cannot speak TLS); -1 = off (the
    health service is always on the main gRPC port too). Readiness (``kdn.v1.Data``): every tier available and
    registered with the controller (docs/operations.md, "Health and readiness")."""
    link_gbps: float = 0.0
    """Emulated link speed for benchmarks: the bulk channel's sends share a token bucket of this many Gbit/s
    (0 = off, the default). Lets one host measure 10 / 25 / 100 Gbit/s links."""
    send_policy: str = "srpt"
    """Order of the bulk channel's replies when more are ready than ``send_slots``: ``srpt`` (shortest remaining
    first, aged by ``send_aging``; kdn/wire/schedule.py) or ``fifo``."""
    send_slots: int = 16
    """Replies the bulk channel sends at once (each 4 MiB per turn); 0 = no limit, no ordering. The default is
    above one client's ``bulk_streams``, so one client alone keeps all its streams."""
    send_aging: float = 0.1
    """λ of ``srpt`` on the send path (seconds of priority per second waited)."""
    tiers: list[TierSpec] = field(default_factory=lambda: [
        TierSpec.parse({"kind": "memory", "capacity": "1GiB"}),
        TierSpec.parse({"kind": "disk", "capacity": "10GiB"}),
    ])


@dataclass
class ClientConfig:
    controller: str = "127.0.0.1:7070"
    tenant: str = "default"
    token: str = field(default="", repr=False)
    token_file: str = ""
    """File holding ``token`` (e.g. a mounted secret)."""
    codec: str = "raw"
    """``raw``, ``lz4``, ``lossless`` or a ``cachegen-*`` level (docs/codec.md)."""
    codec_profile: str = ""
    """Model profile file for ``cachegen-*`` levels (``kdnctl codec profile`` writes one). Empty: fetch the
    profile of this layout from the controller once and cache it in ``profile_cache``."""
    profile_cache: str = ""
    """Directory for model profiles fetched from the controller ("" = ``~/.cache/kdn/profiles``)."""
    chunk_size: int = 256
    """Tokens per chunk."""
    layer_group: int = 1
    """Layers per chunk section (the unit of layer-wise decode)."""
    store_partial: bool = True
    """Also store (and look up) the final partial chunk of a prompt."""
    store_queue: int = 64
    """Pending store jobs; when full, new stores are dropped (counted) rather than blocking the caller."""
    timeout_s: float = 10.0
    """Deadline of each remote call."""
    transport: str = "bulk"
    """``bulk`` (framed TCP channel, falls back to gRPC) or ``grpc``."""
    fetch_workers: int = 8
    """Threads that fetch chunks (at least ``bulk_streams``)."""
    bulk_streams: int = 8
    """Bulk connections per node: a node's share of a fetch is striped over this many streams."""
    receive_pool_bytes: int = 2 << 30
    """Receive buffers kept for reuse (pre-faulted; pinned with ``receive_pool_pinned``): objects arriving over the
    bulk channel land there instead of in a fresh allocation each. Grows on demand up to this size; 0 = off."""
    receive_pool_pinned: str = "auto"
    """``auto`` (page-locked when CUDA is available: GPU copies at DMA rate), ``true`` or ``false``."""
    transfer_policy: str = "srpt"
    """Order of concurrent fetches on the streams: ``srpt`` (shortest remaining first with aging) or ``fifo``."""
    transfer_aging: float = 0.1
    """λ of ``srpt``: seconds of priority a waiting fetch gains per second waited (kdn/wire/schedule.py)."""
    hedge_after_s: float = 1.0
    """A node whose batch has not arrived after this long is raced by the next holder of its chunks (no
    head-of-line blocking behind a stalled node); 0 = never."""
    shared_memory: bool = True
    """Read objects in place from the shared memory of nodes on this host (with ``transport: bulk``; falls back
    to the bulk channel)."""
    tls: TLSConfig = field(default_factory=TLSConfig)
    """TLS towards controller and nodes (from a config file: the top-level ``tls`` section unless set here)."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Object MAC keys (from a config file: the top-level ``security`` section unless set here)."""
    # Streaming controller (kdn.client.streaming.MultiLevelClient, docs/streaming.md):
    stream_levels: list[str] = field(default_factory=lambda: [
        "raw", "cachegen-high", "cachegen-default", "cachegen-compact"])
    """Levels each chunk is stored at and chosen from, least compressed first."""
    stream_prior_gbps: float = 10.0
    """Throughput assumed for a node before any transfer from it was measured (Gbit/s)."""
    stream_ewma: float = 0.5
    """Weight of the newest transfer in a node's throughput estimate (0 < w <= 1)."""
    stream_wave_chunks: int = 4
    """Chunks fetched between two plans (throughput is re-estimated after each wave)."""
    prefill_tokens_per_s: float = 0.0
    """The engine's measured prefill rate; sets the deadlines (0: no deadline, the least-compressed level)."""


@dataclass
class KDNConfig:
    data_dir: str = field(default_factory=default_data_dir)
    log_level: str = "INFO"
    metrics_port: int = 9400
    """Prometheus metrics port of this process (0 picks a free port, -1 disables)."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    """TLS of this process's servers and of its calls to other KDN processes."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Object MAC keys: nodes verify puts with them, clients sign and verify objects."""

    def node_id(self) -> str:
        return self.node.node_id or f"{socket.gethostname()}:{self.node.port}"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is TierSpec:
        return TierSpec.parse(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        item_type = typing.get_args(tp)[1]
        if item_type is str:
            return {str(k): str(v) for k, v in value.items()}
        return {str(k): _coerce(item_type, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if where.endswith("_bytes") or where.endswith("capacity"):
            return parse_size(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in values.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "tokens":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"invalid setting name {dotted!r}")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _env_overrides(environ: dict[str, str]) -> dict:
    tree: dict = {}
    for name, value in environ.items():
        if name.startswith("KDN_") and "__" in name:
            path = name[4:].lower().replace("__", ".")
            _set_path(tree, path, value)
        elif name in ("KDN_DATA_DIR", "KDN_LOG_LEVEL", "KDN_METRICS_PORT"):
            tree[name[4:].lower()] = value
    return tree


def load_config(path: str | os.PathLike | None = None, *, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> KDNConfig:
    """Load the configuration: defaults < YAML file < environment < ``overrides`` (dotted names from flags)."""
    import yaml

    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("KDN_CONFIG")
    tree: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        tree = loaded
    tree = _merge(tree, _env_overrides(environ))
    flag_tree: dict = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(flag_tree, dotted, value)
    tree = _merge(tree, flag_tree)
    config = _build(KDNConfig, tree, "config")
    config.data_dir = os.path.expanduser(config.data_dir)
    if not config.client.tls.enabled:
        config.client.tls = config.tls
    if not (config.client.security.mac_keys_file or config.client.security.mac_active_key):
        config.client.security = config.security
    _load_secrets(config)
    return config


def _read_secret(path: str, what: str) -> str:
    """The stripped contents of a secret file (the contents never appear in errors or logs)."""
    try:
        text = Path(os.path.expanduser(path)).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {type(exc).__name__}") from None
    if not text:
        raise ConfigError(f"{what} {path} is empty")
    return text


def _load_secrets(config: KDNConfig) -> None:
    """Resolve the ``*_file`` settings of tokens into their fields (a file wins over an inline value)."""
    import yaml

    auth = config.auth
    if auth.tokens_file:
        try:
            extra = yaml.safe_load(_read_secret(auth.tokens_file, "auth.tokens_file"))
        except yaml.YAMLError:
            raise ConfigError(f"auth.tokens_file {auth.tokens_file}: not a YAML mapping") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"auth.tokens_file {auth.tokens_file}: must hold a mapping of token: role")
        auth.tokens = {**auth.tokens, **{str(k): str(v) for k, v in extra.items()}}
    if auth.admin_token_file:
        auth.admin_token = _read_secret(auth.admin_token_file, "auth.admin_token_file")
    if config.node.token_file:
        config.node.token = _read_secret(config.node.token_file, "node.token_file")
    if config.client.token_file:
        config.client.token = _read_secret(config.client.token_file, "client.token_file")
