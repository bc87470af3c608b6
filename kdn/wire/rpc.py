"""gRPC plumbing shared by servers and clients: channel/server options and error translation."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from concurrent import futures
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc

from kdn import errors

if TYPE_CHECKING:
    from kdn.config import TLSConfig

__all__ = ["MAX_MESSAGE_BYTES", "make_channel", "create_server", "ssl_context", "raise_from_rpc", "servicer_method",
           "abort", "status_of"]

log = logging.getLogger(__name__)

#: Largest gRPC message either side accepts; frames are at most 4 MiB of payload.
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_FRAME_BYTES = 4 << 20

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]

_STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AuthError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.CorruptObject: grpc.StatusCode.DATA_LOSS,
    errors.CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_ERROR = {code: cls for cls, code in _STATUS.items() if cls is not errors.ConfigError}


def status_of(exc: errors.KDNError) -> grpc.StatusCode:
    """The gRPC status code of a KDN error (nearest class in its MRO)."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.UNKNOWN


def _pem(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"cannot read TLS {what} {path}: {exc}") from exc


def ssl_context(tls: TLSConfig | None, *, server: bool) -> ssl.SSLContext | None:
    """The ``ssl`` context of the bulk channel for ``tls`` (same files and rules as gRPC), or None when TLS is off
    (for a server: when it has no certificate)."""
    if tls is None or not tls.enabled or (server and not tls.cert):
        return None
    try:
        if server:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca or None)
            context.verify_mode = ssl.CERT_REQUIRED if tls.client_auth else ssl.CERT_NONE
        else:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
        if tls.cert:
            context.load_cert_chain(str(Path(tls.cert).expanduser()), str(Path(tls.key).expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"cannot set up TLS for the bulk channel: {exc}") from exc
    return context


def make_channel(address: str, tls: TLSConfig | None = None,
                 extra_options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel with KDN's message limits and keepalive; TLS (and a client certificate) when ``tls`` is on;
    ``extra_options`` are further gRPC channel arguments (e.g. reconnect backoff)."""
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address, options=[*_OPTIONS, *extra_options])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_pem(tls.ca, "ca") if tls.ca else None,
        private_key=_pem(tls.key, "key") if tls.key else None,
        certificate_chain=_pem(tls.cert, "cert") if tls.cert else None)
    options = [*_OPTIONS, *extra_options]
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, credentials, options=options)


def create_server(host: str, port: int, workers: int = 16, tls: TLSConfig | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server bound to ``host:port`` (port 0 picks one), TLS when ``tls`` has a certificate; returns the
    server and the bound port."""
    from kdn.wire.grpc_log import quiet_malformed_messages

    quiet_malformed_messages()  # grpc's tracebacks for undecodable requests: a log flood before authentication
    # No SO_REUSEPORT: a second server on a busy port must fail, not silently share it.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdn-rpc"),
                         options=[*_OPTIONS, ("grpc.so_reuseport", 0)])
    credentials = None
    if tls is not None and tls.cert:
        credentials = grpc.ssl_server_credentials(
            [(_pem(tls.key, "key"), _pem(tls.cert, "cert"))],
            root_certificates=_pem(tls.ca, "ca") if tls.ca else None,
            require_client_auth=tls.client_auth)
    try:
        address = f"{host}:{port}"
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises on a failed bind (older versions returned 0)
        bound = 0
    if bound == 0:
        raise errors.ConfigError(f"cannot bind gRPC server to {host}:{port} (port in use?)")
    return server, bound


def raise_from_rpc(exc: grpc.RpcError, what: str) -> None:
    """Translate a client-side ``grpc.RpcError`` into the KDN error tree (cause kept)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _ERROR.get(code, errors.Unavailable)
    raise cls(f"{what}: {detail or code.name}") from exc


def abort(context: grpc.ServicerContext, exc: BaseException, what: str = "call") -> NoReturn:
    """End a server-side call: KDN errors keep their meaning, anything else is logged and becomes INTERNAL."""
    if isinstance(exc, errors.KDNError):
        context.abort(status_of(exc), str(exc))
    log.error("internal error in %s", what, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable")  # context.abort always raises


F = TypeVar("F", bound=Callable[..., Any])


def servicer_method(func: F) -> F:
    """Wrap a unary servicer method: KDN errors become gRPC status codes; anything else is logged as INTERNAL."""

    @wraps(func)
    def wrapper(self, request, context):
        try:
            return func(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the server must survive any bug in one call
            abort(context, exc, func.__name__)

    return wrapper  # type: ignore[return-value]
