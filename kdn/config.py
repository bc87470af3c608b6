"""KDN's one typed configuration.

Precedence, lowest to highest: built-in defaults < YAML file (``--config PATH`` or ``$KDN_CONFIG``) <
environment variables ``KDN_<SECTION>__<FIELD>`` (e.g. ``KDN_NODE__PORT=7100``, ``KDN_CLIENT__TENANT=acme``) <
command-line flags (dedicated flags such as ``--port``, and ``--set section.field=value`` for any field).

Sizes accept ``1048576``, ``"512MiB"``, ``"4GiB"``, ``"10GB"``. Tiers are a list of ``{kind: ..., <fields>}``
validated against the tier's own config dataclass (see ``kdn.tiers``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdn.errors import ConfigError

__all__ = [
    "KDNConfig", "ControllerConfig", "NodeConfig", "ClientConfig", "AuthConfig", "TierSpec",
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
        from kdn.tiers import tier_class

        fields = dict(raw)
        kind = fields.pop("kind")
        config_cls = tier_class(kind).config_class
        return cls(kind, _build(config_cls, fields, f"tier {kind}"))


@dataclass
class AuthConfig:
    """Bearer tokens. Empty ``tokens``: open mode, the tenant is taken from the request (development only)."""

    tokens: dict[str, str] = field(default_factory=dict)
    """Map of token -> tenant. When set, every RPC needs a token and the tenant comes from it."""


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 7070
    """gRPC port of the control plane (0 picks a free port)."""
    node_timeout_s: float = 10.0
    """A node that has not sent a heartbeat for this long is marked dead and its index entries are ignored."""


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
    controller: str = "127.0.0.1:7070"
    """Controller address; empty runs the node standalone."""
    token: str = ""
    """Token the node presents to the controller (must map to ``@admin`` when auth tokens are configured)."""
    heartbeat_interval_s: float = 2.0
    max_object_bytes: int = 1 << 30
    """Objects larger than this are refused."""
    write_policy: str = "write-through"
    """``write-through`` (puts also go to every durable tier) or ``write-back`` (demote on eviction)."""
    tiers: list[TierSpec] = field(default_factory=lambda: [
        TierSpec.parse({"kind": "memory", "capacity": "1GiB"}),
        TierSpec.parse({"kind": "disk", "capacity": "10GiB"}),
    ])


@dataclass
class ClientConfig:
    controller: str = "127.0.0.1:7070"
    tenant: str = "default"
    token: str = ""
    codec: str = "raw"
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
    fetch_workers: int = 4


@dataclass
class KDNConfig:
    data_dir: str = field(default_factory=default_data_dir)
    log_level: str = "INFO"
    metrics_port: int = 9400
    """Prometheus metrics port of this process (0 picks a free port, -1 disables)."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

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
        return {str(k): str(v) for k, v in value.items()}
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
    return config
