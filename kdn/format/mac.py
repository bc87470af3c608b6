"""The cluster keyring that authenticates chunk objects (docs/security.md, "Integrity and forgery").

A :class:`Keyring` maps key ids to secrets. The *active* key id signs new objects; every listed key id verifies,
so a secret is rotated by adding a new key id, making it active everywhere, and dropping the old one once the
objects it signed have aged out. From each secret two 32-byte keys are derived with BLAKE3's key derivation
(one for header MACs, one for section digests), so neither is ever used for two purposes.

Keys file (``security.mac_keys_file`` or ``$KDN_MAC_KEYS_FILE``): one ``key_id: secret`` per line, ``#`` comments
and blank lines ignored; the last key listed is active unless ``security.mac_active_key`` names another.
``$KDN_MAC_KEY`` adds one key (``key_id:secret``, or a bare secret under key id ``env``), active unless
``mac_active_key`` is set. Secrets are at least 32 characters (``openssl rand -hex 32``); they are never logged:
``repr(keyring)`` shows key ids only.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import blake3

from kdn.errors import ConfigError, CorruptObject

__all__ = ["Keyring", "ForgedObject", "load_keyring", "MAC_BYTES", "MIN_SECRET_CHARS", "KEY_ID_RE"]

MAC_BYTES = 32
MIN_SECRET_CHARS = 32
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEADER_CONTEXT = "KDN 2026-12 chunk object v2 header MAC"
_SECTION_CONTEXT = "KDN 2026-12 chunk object v2 section digest"
_THREADED_BYTES = 4 << 20
"""Sections at least this large are hashed with BLAKE3's thread pool (smaller ones: one thread is faster)."""


class ForgedObject(CorruptObject):
    """An object that fails authentication: unsigned for a keyring holder, unknown key id, or a bad MAC/digest."""


def _keyed(key: bytes, data) -> bytes:
    threads = blake3.blake3.AUTO if len(data) >= _THREADED_BYTES else 1
    return blake3.blake3(data, key=key, max_threads=threads).digest()


class Keyring:
    """Key id -> secret; ``active`` signs, all verify. Pass it explicitly to the chunk format's functions."""

    __slots__ = ("active", "_header", "_section")

    def __init__(self, secrets: Mapping[str, bytes | str], active: str = "") -> None:
        if not secrets:
            raise ConfigError("a MAC keyring needs at least one key")
        self._header: dict[str, bytes] = {}
        self._section: dict[str, bytes] = {}
        for key_id, secret in secrets.items():
            if not KEY_ID_RE.fullmatch(key_id):
                raise ConfigError(f"MAC key id {key_id[:70]!r} must be 1-64 characters of [A-Za-z0-9._-]")
            material = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(material) < MIN_SECRET_CHARS:
                raise ConfigError(f"the secret of MAC key id {key_id!r} is shorter than {MIN_SECRET_CHARS} characters")
            self._header[key_id] = blake3.blake3(material, derive_key_context=_HEADER_CONTEXT).digest()
            self._section[key_id] = blake3.blake3(material, derive_key_context=_SECTION_CONTEXT).digest()
        self.active = active or list(secrets)[-1]
        if self.active not in self._header:
            raise ConfigError(f"active MAC key id {self.active!r} is not in the keyring {sorted(self._header)}")

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._header)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._header

    def __repr__(self) -> str:
        return f"Keyring(active={self.active!r}, key_ids={list(self._header)!r})"

    def _key(self, table: dict[str, bytes], key_id: str) -> bytes:
        try:
            return table[key_id]
        except KeyError:
            raise ForgedObject(f"object signed with unknown MAC key id {key_id[:70]!r}") from None

    def header_mac(self, key_id: str, data) -> bytes:
        """The MAC of header bytes ``data`` under ``key_id`` (raises :class:`ForgedObject` for unknown ids)."""
        return blake3.blake3(data, key=self._key(self._header, key_id)).digest()

    def section_digest(self, key_id: str, data) -> bytes:
        """The keyed digest of one section's payload bytes under ``key_id``."""
        return _keyed(self._key(self._section, key_id), data)

    def check_header(self, key_id: str, data, mac: bytes) -> None:
        if not hmac.compare_digest(self.header_mac(key_id, data), mac):
            raise ForgedObject("header MAC mismatch (forged, moved or damaged object)")

    def check_section(self, key_id: str, data, digest: bytes) -> None:
        if not hmac.compare_digest(self.section_digest(key_id, data), digest):
            raise ForgedObject("section digest mismatch (forged or damaged payload)")

    # -- loading -----------------------------------------------------------------------------------------------
    @staticmethod
    def parse_lines(text: str, where: str = "keys file") -> dict[str, str]:
        """``key_id: secret`` lines -> ordered mapping (errors name the line, never the secret)."""
        out: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, secret = line.partition(":")
            if not sep or not secret.strip():
                raise ConfigError(f"{where} line {number}: expected 'key_id: secret'")
            key_id = key_id.strip()
            if key_id in out:
                raise ConfigError(f"{where} line {number}: key id {key_id!r} listed twice")
            out[key_id] = secret.strip()
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike, active: str = "") -> Keyring:
        try:
            text = Path(os.path.expanduser(path)).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read MAC keys file {path}: {type(exc).__name__}") from None
        return cls(cls.parse_lines(text, f"MAC keys file {path}"), active)


def load_keyring(config: Any = None, environ: Mapping[str, str] | None = None) -> Keyring | None:
    """The keyring configured by ``config`` (a ``SecurityConfig``, or any config with a ``security`` section:
    ``ClientConfig``, ``KDNConfig``) and the environment; ``None`` when no secret is configured (checksums only)."""
    environ = os.environ if environ is None else environ
    security = getattr(config, "security", config)
    path = environ.get("KDN_MAC_KEYS_FILE") or getattr(security, "mac_keys_file", "") or ""
    active = getattr(security, "mac_active_key", "") or ""
    secrets: dict[str, str] = {}
    if path:
        try:
            text = Path(os.path.expanduser(path)).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read MAC keys file {path}: {type(exc).__name__}") from None
        secrets.update(Keyring.parse_lines(text, f"MAC keys file {path}"))
    env_key = environ.get("KDN_MAC_KEY", "")
    if env_key:
        key_id, sep, secret = env_key.partition(":")
        if not sep or not KEY_ID_RE.fullmatch(key_id):
            key_id, secret = "env", env_key
        secrets.pop(key_id, None)
        secrets[key_id] = secret  # last: active unless mac_active_key says otherwise
    if not secrets:
        if active:
            raise ConfigError("security.mac_active_key is set but no MAC keys are configured")
        return None
    return Keyring(secrets, active)
