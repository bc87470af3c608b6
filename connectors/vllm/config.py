"""The vLLM connector's settings: one KDN config (file, environment, ``kv_connector_extra_config``).

Precedence, lowest to highest: KDN defaults < YAML file (``kdn_config`` or ``$KDN_CONFIG``) < ``KDN_CLIENT__*``
environment variables < the ``client`` mapping inside ``kv_connector_extra_config``. Connector-only settings sit
at the top level of ``kv_connector_extra_config``::

    {"kdn_config": "/etc/kdn.yaml",
     "client": {"controller": "10.0.0.5:7070", "tenant": "acme", "codec": "lz4", "chunk_size": 256},
     "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
     "stats_path": "/var/log/kdn-vllm.jsonl"}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kdn.config import ClientConfig, load_config
from kdn.errors import ConfigError

__all__ = ["ConnectorSettings", "check_chunk_size"]


@dataclass
class ConnectorSettings:
    """Everything the connector reads from ``kv_connector_extra_config``."""

    client: ClientConfig = field(default_factory=ClientConfig)
    """The KDN client settings (controller, tenant, token, codec, chunk_size, ...)."""
    model_id: str = ""
    """Model name in the layout fingerprint ("" = vLLM's served model name). Engines share KV only when equal."""
    stats_path: str = ""
    """Append one JSON line per load and store to this file ("" = log only)."""
    load: bool = True
    """Look up and load prefixes from KDN (per request: ``kv_transfer_params={"kdn_load": false}``)."""
    store: bool = True
    """Store computed prompt KV into KDN (per request: ``kv_transfer_params={"kdn_store": false}``)."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None, environ: dict[str, str] | None = None
                          ) -> ConnectorSettings:
        """Parse ``kv_connector_extra_config``; raises :class:`ConfigError` for unknown or bad values."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)} | {"kdn_config"}
        unknown = set(extra) - known
        if unknown:
            raise ConfigError(f"kv_connector_extra_config: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        client = extra.pop("client", None) or {}
        if not isinstance(client, dict):
            raise ConfigError("kv_connector_extra_config.client must be a mapping of KDN client settings")
        overrides = {f"client.{k}": v for k, v in client.items()}
        config = load_config(extra.pop("kdn_config", None), overrides=overrides, environ=environ)
        settings = cls(client=config.client)
        for name, value in extra.items():
            expected = type(getattr(settings, name))
            if expected is bool and not isinstance(value, bool):
                raise ConfigError(f"kv_connector_extra_config.{name} must be true or false, got {value!r}")
            if expected is str and not isinstance(value, str):
                raise ConfigError(f"kv_connector_extra_config.{name} must be a string, got {value!r}")
            setattr(settings, name, value)
        return settings


def check_chunk_size(chunk_size: int, block_size: int) -> None:
    """KDN chunks must hold whole engine blocks, so every hit and every store is block-aligned."""
    if chunk_size <= 0 or chunk_size % block_size:
        suggestion = max(block_size, (chunk_size // block_size) * block_size)
        raise ConfigError(f"KDN chunk_size {chunk_size} is not a multiple of vLLM's block size {block_size}; "
                          f"set client.chunk_size to e.g. {suggestion}")
