"""KDN's one exception tree.

::

    KDNError
    ├── PermanentError            retrying the same call cannot help
    │   ├── ConfigError           bad configuration value or file
    │   ├── InvalidRequest        wrong shape/dtype/size, bad key, unknown codec
    │   ├── AuthError             missing or invalid token, tenant not allowed
    │   │   └── PermissionDenied  valid token, but its role may not make this call
    │   ├── NotFound              unknown key, node or tenant object
    │   └── CorruptObject         checksum, magic, version or fingerprint mismatch
    └── RetryableError            the same call may succeed later
        ├── Unavailable           a node, the controller or a backend is down or unreachable
        ├── DeadlineExceeded      the call ran past its deadline
        └── CapacityError         a tier or queue is full right now

Foreign errors (grpc, redis, botocore, OSError) are translated at one boundary each, with the cause kept
(``raise Unavailable(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "KDNError",
    "PermanentError",
    "RetryableError",
    "ConfigError",
    "InvalidRequest",
    "AuthError",
    "PermissionDenied",
    "NotFound",
    "CorruptObject",
    "Unavailable",
    "DeadlineExceeded",
    "CapacityError",
]


class KDNError(Exception):
    """Base of every error KDN raises on purpose."""

    retryable: bool = False


class PermanentError(KDNError):
    """Retrying the same call cannot succeed."""


class RetryableError(KDNError):
    """The same call may succeed later."""

    retryable = True


class ConfigError(PermanentError):
    """A configuration value or file is invalid."""


class InvalidRequest(PermanentError):
    """The request is malformed: wrong shape, dtype, size, key or codec."""


class AuthError(PermanentError):
    """Missing or invalid credentials."""


class PermissionDenied(AuthError):
    """The token is valid but its role (tenant, node, admin) may not make this call."""


class NotFound(PermanentError):
    """The key, node or object does not exist (or is not visible to this tenant)."""


class CorruptObject(PermanentError):
    """A chunk object failed verification: checksum, magic, version, key or fingerprint."""


class Unavailable(RetryableError):
    """A node, the controller or a storage backend cannot be reached."""


class DeadlineExceeded(RetryableError):
    """The call did not finish before its deadline."""


class CapacityError(RetryableError):
    """A tier or a queue is full right now."""
