"""Who is calling: bearer tokens mapped to tenants or to a role, and which calls each may make.

With tokens configured (``auth.tokens``, ``auth.tokens_file``), every call carries ``authorization: Bearer <token>``
and the principal comes from the token, never from a request field. A token maps to

- a **tenant** name: the tenant's engines; they see and change only keys of their tenant;
- ``@node`` (or ``@node:<node_id>``, bound to one node): storage nodes registering, heartbeating and reporting
  inventory to the controller. A node principal may do nothing else: no tenant data, no operator call;
- ``@admin``: operators (``kdnctl``) and the controller's calls to nodes (placement moves, evictions); acts on
  every tenant.

Token map keys may be ``sha256:<hex>`` digests instead of tokens, so hosts that only *check* a token (every storage
node checks the controller's admin token) need not hold it (``kdnctl gen-secrets`` writes such a map).

Without tokens (open mode, for development on loopback only; see :func:`check_bind`) every caller is admin and its
tenant comes from the ``x-kdn-tenant`` metadata (default ``default``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kdn.errors import AuthError, CapacityError, ConfigError, PermissionDenied
from kdn.format.keys import validate_name

__all__ = ["ADMIN", "NODE", "TENANT", "Principal", "Authenticator", "RateLimiter", "call_metadata", "key_tenant",
           "token_digest", "is_loopback"]

ADMIN = "@admin"
NODE = "@node"
TENANT = "tenant"
TENANT_HEADER = "x-kdn-tenant"
DIGEST_PREFIX = "sha256:"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a tenant, a storage node or an operator (admin)."""

    tenant: str
    role: str = TENANT
    """``tenant``, ``@node`` or ``@admin``."""
    node_id: str = ""
    """For a node token bound to one node (``@node:<node_id>``): that node; "" = any."""

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    @property
    def node(self) -> bool:
        return self.role == NODE

    def may_access(self, key: str) -> bool:
        """Whether this caller may read or change the object ``key`` (a chunk key string starting with its tenant).

        Node principals may access no object at all."""
        if self.role == ADMIN:
            return True
        return self.role == TENANT and key_tenant(key) == self.tenant

    def require_admin(self) -> Principal:
        if not self.admin:
            raise PermissionDenied("this call needs the admin role")
        return self

    def require_tenant_or_admin(self) -> Principal:
        """Calls on tenant data: storage-node tokens may not make them."""
        if self.node:
            raise PermissionDenied("a storage node's token may not make this call")
        return self

    def require_node(self, node_id: str) -> Principal:
        """Calls a storage node makes about itself (register, heartbeat, inventory)."""
        if self.admin or (self.node and self.node_id in ("", node_id)):
            return self
        if self.node:
            raise PermissionDenied(f"this node token is bound to node {self.node_id!r}, not {node_id!r}")
        raise PermissionDenied("this call needs a storage node's token")


def key_tenant(key: str) -> str:
    return key.split("/", 1)[0]


def token_digest(token: str) -> str:
    """The ``sha256:<hex>`` form of ``token`` for token maps held by hosts that only check it."""
    return DIGEST_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _parse_role(value: str) -> tuple[str, str, str]:
    """A token map value -> (role, tenant, node_id)."""
    if value == ADMIN:
        return ADMIN, "", ""
    if value == NODE or value.startswith(NODE + ":"):
        node_id = value[len(NODE) + 1:] if value != NODE else ""
        if value != NODE and not node_id:
            raise ConfigError("auth.tokens: '@node:' needs a node id")
        return NODE, "", node_id
    if value.startswith("@"):
        raise ConfigError(f"auth.tokens: unknown role {value!r}; use a tenant name, @node, @node:<id> or @admin")
    return TENANT, validate_name("tenant", value), ""


class Authenticator:
    """Maps tokens to principals; tokens are kept and compared as SHA-256 digests, in constant time."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self._entries: list[tuple[bytes, tuple[str, str, str]]] = []
        for token, value in (tokens or {}).items():
            if not token or token == DIGEST_PREFIX:
                raise AuthError("empty token in auth.tokens")
            digest = token[len(DIGEST_PREFIX):] if token.startswith(DIGEST_PREFIX) else None
            if digest is not None:
                try:
                    raw = bytes.fromhex(digest)
                except ValueError:
                    raw = b""
                if len(raw) != 32:
                    raise ConfigError("auth.tokens: a sha256: entry needs 64 hex digits")
            else:
                raw = hashlib.sha256(token.encode()).digest()
            self._entries.append((raw, _parse_role(value)))

    @property
    def open(self) -> bool:
        return not self._entries

    def authenticate(self, token: str, tenant_hint: str = "") -> Principal:
        """Resolve a token (and, in open mode, the tenant hint) to a principal; raises :class:`AuthError`."""
        if self.open:
            return Principal(validate_name("tenant", tenant_hint or "default"), ADMIN)
        found = None
        if token:
            presented = hashlib.sha256(token.encode()).digest()
            for known, entry in self._entries:  # no early exit: the time taken does not depend on the match
                if hmac.compare_digest(known, presented):
                    found = entry
        if found is None:
            raise AuthError("missing or invalid token")
        role, tenant, node_id = found
        if role == ADMIN:
            return Principal(tenant_hint or "default", ADMIN)
        if role == NODE:
            return Principal("", NODE, node_id)
        return Principal(tenant)

    def from_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        token, tenant = "", ""
        for name, value in metadata:
            if isinstance(value, bytes):
                continue
            if name == "authorization" and value.startswith("Bearer "):
                token = value[7:]
            elif name == TENANT_HEADER:
                tenant = value
        return self.authenticate(token, tenant)


class RateLimiter:
    """Per-tenant token buckets: ``rates`` maps tenant -> requests per second (burst: one second's worth)."""

    def __init__(self, rates: dict[str, float], clock=time.monotonic) -> None:
        self._rates = {t: float(r) for t, r in rates.items() if r and r > 0}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._clock = clock
        self._lock = threading.Lock()

    def admit(self, principal: Principal, cost: float = 1.0) -> None:
        """Take ``cost`` requests from the caller's tenant bucket; raise :class:`CapacityError` when it is empty.
        Nodes and operators are not limited."""
        if principal.role != TENANT:
            return
        rate = self._rates.get(principal.tenant)
        if rate is None:
            return
        now = self._clock()
        with self._lock:
            level, last = self._buckets.get(principal.tenant, (rate, now))
            level = min(rate, level + (now - last) * rate)
            if level < cost:
                self._buckets[principal.tenant] = (level, now)
                raise CapacityError(f"tenant {principal.tenant!r} is over its request rate ({rate:g}/s)")
            self._buckets[principal.tenant] = (level - cost, now)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` accepts connections from this machine only ("" / 0.0.0.0 / :: are not)."""
    if host in ("", "0.0.0.0", "::", "*"):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def call_metadata(token: str = "", tenant: str = "") -> tuple[tuple[str, str], ...]:
    """gRPC metadata a client sends."""
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if tenant:
        md.append((TENANT_HEADER, tenant))
    return tuple(md)
