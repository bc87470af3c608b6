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

__all__ = ["ConnectorSettings", "check_chunk_size", "weights_id"]


@dataclass
class ConnectorSettings:
    """Everything the connector reads from ``kv_connector_extra_config``."""

    client: ClientConfig = field(default_factory=ClientConfig)
    """The KDN client settings (controller, tenant, token, codec, chunk_size, ...)."""
    model_id: str = ""
    """Model name in the layout fingerprint ("" = :func:`weights_id` of the checkpoint: config + weight files, so
    the same weights served from different folders share KV). Engines share KV only when equal."""
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


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def weights_id(model: str, model_type: str = "") -> str:
    """The default ``model_id``: what identifies the *weights*, not the path they were served from.

    For a local folder: a BLAKE2b digest of ``config.json`` and, per weight file (``*.safetensors``, ``*.bin``,
    ``*.gguf``, ...), its name, size and ``_SAMPLES`` evenly spaced 64 KiB samples of its bytes (the first holds
    the safetensors header: every tensor's name, dtype, shape and offset); reading ~1 MiB per file keeps engine
    start fast even for large checkpoints, and any fine-tune changes the sampled bytes. Two engines serving the
    same checkpoint from different folders get the same id; different weights get different ids. A hub model id
    (not a folder) is returned as it is.
    """
    import hashlib
    from pathlib import Path

    folder = Path(model)
    if not folder.is_dir():
        return model
    digest = hashlib.blake2b(digest_size=12, person=b"kdn-weights-v1")
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.exists() else b"")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return f"{model_type or 'model'}@{digest.hexdigest()}"
