"""The keyring that authenticates chunk objects (docs/security.md, "Integrity and forgery").

Objects are signed **per tenant**: an object whose key belongs to tenant ``T`` carries a MAC and section digests
keyed by ``T``'s key, so a holder of one tenant's key cannot make an object that a reader of another tenant (or a
node) accepts. A tenant key is derived from a cluster *master secret* with BLAKE3's key derivation::

    tenant_key = BLAKE3-derive_key("KDN 2026-12 per-tenant MAC key", len(T) || T || len(key_id) || key_id || secret)

and from each tenant key two 32-byte keys are derived (one for header MACs, one for section digests), so no key
serves two purposes. Nodes and operators hold the master secrets and derive the key of whichever tenant an object
names; a tenant's engines are given only their tenant's keys (``kdnctl derive-key``).

A :class:`Keyring` maps key ids to master secrets and/or ``(tenant, key id)`` to tenant keys. The *active* key id
signs new objects; every listed key id verifies, so a secret is rotated by adding a new key id, making it active
everywhere, and dropping the old one once the objects it signed have aged out.

Keys file (``security.mac_keys_file`` or ``$KDN_MAC_KEYS_FILE``), one entry a line, ``#`` comments and blank lines
ignored, the last entry's key id active unless ``security.mac_active_key`` names another:

- ``key_id: secret`` — a master secret (nodes, admins): at least 32 characters (``openssl rand -hex 32``);
- ``key_id@tenant: hex`` — one tenant's derived key (64 hex digits; what ``kdnctl derive-key`` writes for engines).

``$KDN_MAC_KEY`` adds one entry (``key_id:secret``, ``key_id@tenant:hex``, or a bare secret under key id ``env``),
active unless ``mac_active_key`` is set. Secrets are never logged: ``repr(keyring)`` shows key ids and tenants only.
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

__all__ = ["Keyring", "ForgedObject", "load_keyring", "derive_tenant_key", "key_tenant", "MAC_BYTES",
           "MIN_SECRET_CHARS", "KEY_ID_RE", "TENANT_KEY_BYTES"]

MAC_BYTES = 32
TENANT_KEY_BYTES = 32
MIN_SECRET_CHARS = 32
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_TENANT_CONTEXT = "KDN 2026-12 per-tenant MAC key"
_HEADER_CONTEXT = "KDN 2026-12 chunk object v2 tenant-keyed header MAC"
_SECTION_CONTEXT = "KDN 2026-12 chunk object v2 tenant-keyed section digest"
_THREADED_BYTES = 4 << 20
"""Sections at least this large are hashed with BLAKE3's thread pool (smaller ones: one thread is faster)."""
_DERIVED_LIMIT = 4096
"""Tenant keys a master keyring keeps derived (the cache is dropped when full: a forged header can name any
tenant, so it must stay bounded)."""


class ForgedObject(CorruptObject):
    """An object that fails authentication: unsigned for a keyring holder, unknown key id, no key of its tenant,
    signed under the older cluster-wide key, or a bad MAC/digest."""


def key_tenant(key: str) -> str:
    """The tenant a key string names: its first ``/``-separated component (chunk keys start with the tenant)."""
    return key.partition("/")[0]


def _lp(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "little") + data


def derive_tenant_key(secret: bytes | str, tenant: str, key_id: str) -> bytes:
    """The 32-byte key of ``tenant`` under master ``secret`` of ``key_id`` (BLAKE3 derive_key mode)."""
    material = secret.encode() if isinstance(secret, str) else bytes(secret)
    return blake3.blake3(_lp(tenant) + _lp(key_id) + material, derive_key_context=_TENANT_CONTEXT).digest()


def _subkeys(tenant_key: bytes) -> tuple[bytes, bytes]:
    return (blake3.blake3(tenant_key, derive_key_context=_HEADER_CONTEXT).digest(),
            blake3.blake3(tenant_key, derive_key_context=_SECTION_CONTEXT).digest())


def _keyed(key: bytes, data) -> bytes:
    threads = blake3.blake3.AUTO if len(data) >= _THREADED_BYTES else 1
    return blake3.blake3(data, key=key, max_threads=threads).digest()


def _tenant_key_bytes(value: bytes | str, where: str) -> bytes:
    if isinstance(value, str):
        if not _HEX_RE.fullmatch(value):
            raise ConfigError(f"{where}: a tenant key must be {2 * TENANT_KEY_BYTES} hex digits "
                              "(kdnctl derive-key writes it)")
        return bytes.fromhex(value)
    if len(value) != TENANT_KEY_BYTES:
        raise ConfigError(f"{where}: a tenant key must be {TENANT_KEY_BYTES} bytes")
    return bytes(value)


class Keyring:
    """Master secrets (key id -> secret) and/or tenant keys ((tenant, key id) -> key); ``active`` signs, all
    verify. Pass it explicitly to the chunk format's functions."""

    __slots__ = ("active", "_masters", "_given", "_derived", "_order")

    def __init__(self, secrets: Mapping[str, bytes | str] | None = None, active: str = "", *,
                 tenant_keys: Mapping[tuple[str, str], bytes | str] | None = None) -> None:
        secrets, tenant_keys = secrets or {}, tenant_keys or {}
        if not secrets and not tenant_keys:
            raise ConfigError("a MAC keyring needs at least one key")
        self._masters: dict[str, bytes] = {}
        self._given: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self._derived: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        order: list[str] = []
        for key_id, secret in secrets.items():
            self._check_id(key_id)
            material = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(material) < MIN_SECRET_CHARS:
                raise ConfigError(f"the secret of MAC key id {key_id!r} is shorter than {MIN_SECRET_CHARS} characters")
            self._masters[key_id] = material
            order.append(key_id)
        for (tenant, key_id), value in tenant_keys.items():
            self._check_id(key_id)
            if not _TENANT_RE.fullmatch(tenant):
                raise ConfigError(f"MAC tenant key {key_id!r}: invalid tenant name {tenant[:70]!r}")
            self._given[(tenant, key_id)] = _subkeys(_tenant_key_bytes(value, f"MAC key {key_id}@{tenant}"))
            order.append(key_id)
        self._order = tuple(dict.fromkeys(order))
        self.active = active or order[-1]
        if self.active not in self._order:
            raise ConfigError(f"active MAC key id {self.active!r} is not in the keyring {sorted(self._order)}")

    @staticmethod
    def _check_id(key_id: str) -> None:
        if not KEY_ID_RE.fullmatch(key_id):
            raise ConfigError(f"MAC key id {key_id[:70]!r} must be 1-64 characters of [A-Za-z0-9._-]")

    @property
    def key_ids(self) -> tuple[str, ...]:
        return self._order

    @property
    def holds_master(self) -> bool:
        """Whether this keyring can derive every tenant's keys (nodes, admins) rather than only listed ones."""
        return bool(self._masters)

    @property
    def tenants(self) -> tuple[str, ...]:
        """Tenants whose keys are listed individually (a tenant client's keyring: one)."""
        return tuple(dict.fromkeys(t for t, _ in self._given))

    def covers(self, tenant: str, key_id: str | None = None) -> bool:
        """Whether this keyring holds ``tenant``'s key under ``key_id`` (any listed key id when None)."""
        ids = self._order if key_id is None else (key_id,)
        return any(k in self._masters or (tenant, k) in self._given for k in ids)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._order

    def __repr__(self) -> str:
        return (f"Keyring(active={self.active!r}, key_ids={list(self._order)!r}, master={self.holds_master}, "
                f"tenants={list(self.tenants)!r})")

    def _keys(self, tenant: str, key_id: str) -> tuple[bytes, bytes]:
        pair = self._given.get((tenant, key_id)) or self._derived.get((tenant, key_id))
        if pair is not None:
            return pair
        secret = self._masters.get(key_id)
        if secret is None:
            if key_id in self._order:
                raise ForgedObject(f"this MAC keyring holds no key of tenant {tenant[:70]!r} (key id {key_id!r})")
            raise ForgedObject(f"object signed with unknown MAC key id {key_id[:70]!r}")
        pair = _subkeys(derive_tenant_key(secret, tenant, key_id))
        if len(self._derived) >= _DERIVED_LIMIT:
            self._derived.clear()
        self._derived[(tenant, key_id)] = pair
        return pair

    def signer(self, tenant: str) -> str:
        """The key id that signs ``tenant``'s objects (the active one); ConfigError if this keyring may not."""
        if not self.covers(tenant, self.active):
            held = list(self.tenants)
            raise ConfigError(f"this MAC keyring cannot sign objects of tenant {tenant[:70]!r} under key id "
                              f"{self.active!r}: it holds the keys of tenant(s) {held} only "
                              f"(give this tenant's engines its own file: kdnctl derive-key --tenant {tenant[:70]})")
        return self.active

    def header_mac(self, tenant: str, key_id: str, data) -> bytes:
        """The MAC of header bytes ``data`` of a ``tenant`` object under ``key_id`` (:class:`ForgedObject` when the
        keyring has no such key)."""
        return blake3.blake3(data, key=self._keys(tenant, key_id)[0]).digest()

    def section_digest(self, tenant: str, key_id: str, data) -> bytes:
        """The keyed digest of one section's payload bytes of a ``tenant`` object under ``key_id``."""
        return _keyed(self._keys(tenant, key_id)[1], data)

    def check_header(self, tenant: str, key_id: str, data, mac: bytes) -> None:
        if not hmac.compare_digest(self.header_mac(tenant, key_id, data), mac):
            raise ForgedObject("header MAC mismatch (forged, moved, another tenant's or damaged object)")

    def check_section(self, tenant: str, key_id: str, data, digest: bytes) -> None:
        if not hmac.compare_digest(self.section_digest(tenant, key_id, data), digest):
            raise ForgedObject("section digest mismatch (forged or damaged payload)")

    # -- tenant keys -------------------------------------------------------------------------------------------
    def for_tenant(self, tenant: str) -> Keyring:
        """The keyring of ``tenant``'s engines: its derived key under every master key id, same active key id."""
        if not self._masters:
            raise ConfigError("deriving a tenant's keys needs the master secrets (security.mac_keys_file of an "
                              "admin or node), not a tenant key file")
        if not _TENANT_RE.fullmatch(tenant):
            raise ConfigError(f"invalid tenant name {tenant[:70]!r}: use 1-64 characters of [A-Za-z0-9_.-]")
        keys = {(tenant, k): derive_tenant_key(s, tenant, k) for k, s in self._masters.items()}
        return Keyring(tenant_keys=keys, active=self.active if self.active in self._masters else "")

    def tenant_file(self, tenant: str) -> str:
        """The text of ``tenant``'s keys file (``key_id@tenant: hex`` lines, the active key id last)."""
        ring = self.for_tenant(tenant)
        ids = [k for k in self._masters if k != ring.active] + [ring.active]
        lines = [f"# KDN MAC keys of tenant {tenant} (kdnctl derive-key): give them to this tenant's engines only.",
                 "# They sign and verify this tenant's objects and no other's. Key ids: the last one listed signs."]
        lines += [f"{k}@{tenant}: {derive_tenant_key(self._masters[k], tenant, k).hex()}" for k in ids]
        return "\n".join(lines) + "\n"

    # -- loading -----------------------------------------------------------------------------------------------
    @staticmethod
    def parse_lines(text: str, where: str = "keys file") -> dict[str, str]:
        """``key_id: secret`` / ``key_id@tenant: hex`` lines -> ordered mapping (errors name the line, never the
        secret)."""
        out: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, secret = line.partition(":")
            if not sep or not secret.strip():
                raise ConfigError(f"{where} line {number}: expected 'key_id: secret' or 'key_id@tenant: hex'")
            name, secret = name.strip(), secret.strip()
            if name in out:
                raise ConfigError(f"{where} line {number}: key id {name!r} listed twice")
            if "@" in name and not _HEX_RE.fullmatch(secret):
                raise ConfigError(f"{where} line {number}: a tenant key must be {2 * TENANT_KEY_BYTES} hex digits "
                                  "(kdnctl derive-key writes it)")
            out[name] = secret
        return out

    @classmethod
    def from_entries(cls, entries: Mapping[str, str], active: str = "") -> Keyring:
        """A keyring from parsed entries (``key_id`` -> master secret, ``key_id@tenant`` -> tenant key hex); the
        last entry's key id is active unless ``active`` is given."""
        masters: dict[str, str] = {}
        tenant_keys: dict[tuple[str, str], str] = {}
        last = ""
        for name, value in entries.items():
            key_id, at, tenant = name.partition("@")
            if at:
                tenant_keys[(tenant, key_id)] = value
            else:
                masters[key_id] = value
            last = key_id
        return cls(masters, active or last, tenant_keys=tenant_keys)

    @classmethod
    def from_file(cls, path: str | os.PathLike, active: str = "") -> Keyring:
        return cls.from_entries(_read_entries(path), active)


def _read_entries(path: str | os.PathLike) -> dict[str, str]:
    try:
        text = Path(os.path.expanduser(path)).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read MAC keys file {path}: {type(exc).__name__}") from None
    return Keyring.parse_lines(text, f"MAC keys file {path}")


def _env_entry(value: str) -> tuple[str, str]:
    name, sep, secret = value.partition(":")
    key_id, at, tenant = name.partition("@")
    if sep and KEY_ID_RE.fullmatch(key_id) and (not at or _TENANT_RE.fullmatch(tenant)):
        return name, secret
    return "env", value


def load_keyring(config: Any = None, environ: Mapping[str, str] | None = None) -> Keyring | None:
    """The keyring configured by ``config`` (a ``SecurityConfig``, or any config with a ``security`` section:
    ``ClientConfig``, ``KDNConfig``) and the environment; ``None`` when no secret is configured (checksums only).

    The keys file may hold master secrets (nodes, admins) or one tenant's derived keys (engines): see the module
    docstring."""
    environ = os.environ if environ is None else environ
    security = getattr(config, "security", config)
    path = environ.get("KDN_MAC_KEYS_FILE") or getattr(security, "mac_keys_file", "") or ""
    active = getattr(security, "mac_active_key", "") or ""
    entries: dict[str, str] = _read_entries(path) if path else {}
    env_key = environ.get("KDN_MAC_KEY", "")
    if env_key:
        name, secret = _env_entry(env_key)
        if "@" in name and not _HEX_RE.fullmatch(secret):
            raise ConfigError(f"$KDN_MAC_KEY: a tenant key must be {2 * TENANT_KEY_BYTES} hex digits")
        entries.pop(name, None)
        entries[name] = secret  # last: active unless mac_active_key says otherwise
    if not entries:
        if active:
            raise ConfigError("security.mac_active_key is set but no MAC keys are configured")
        return None
    return Keyring.from_entries(entries, active)
