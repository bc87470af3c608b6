"""Who is calling: bearer tokens mapped to tenants (or to the admin role).

With tokens configured, every call carries ``authorization: Bearer <token>`` and the tenant comes from the token,
never from a request field. The admin principal (token mapped to ``@admin``) is used by storage nodes and
operators; it may act on every tenant. Without tokens (open mode, for development on localhost) every caller is
admin and its tenant comes from the ``x-kdn-tenant`` metadata (default ``default``).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from kdn.errors import AuthError
from kdn.format.keys import validate_name

__all__ = ["ADMIN", "Principal", "Authenticator", "call_metadata", "key_tenant"]

ADMIN = "@admin"
TENANT_HEADER = "x-kdn-tenant"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    tenant: str
    admin: bool = False

    def may_access(self, key: str) -> bool:
        """Whether this caller may see ``key`` (a chunk key string starting with its tenant)."""
        return self.admin or key_tenant(key) == self.tenant


def key_tenant(key: str) -> str:
    return key.split("/", 1)[0]


class Authenticator:
    """Maps tokens to principals; constant-time token comparison."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self._tokens = dict(tokens or {})
        for token, tenant in self._tokens.items():
            if not token:
                raise AuthError("empty token in auth.tokens")
            if tenant != ADMIN:
                validate_name("tenant", tenant)

    @property
    def open(self) -> bool:
        return not self._tokens

    def authenticate(self, token: str, tenant_hint: str = "") -> Principal:
        """Resolve a token (and, in open mode, the tenant hint) to a principal; raises :class:`AuthError`."""
        if self.open:
            return Principal(validate_name("tenant", tenant_hint or "default"), admin=True)
        for known, tenant in self._tokens.items():
            if token and hmac.compare_digest(known.encode(), token.encode()):
                if tenant == ADMIN:
                    return Principal(tenant_hint or "default", admin=True)
                return Principal(tenant)
        raise AuthError("missing or invalid token")

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


def call_metadata(token: str = "", tenant: str = "") -> tuple[tuple[str, str], ...]:
    """gRPC metadata a client sends."""
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if tenant:
        md.append((TENANT_HEADER, tenant))
    return tuple(md)
