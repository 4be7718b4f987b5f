"""Optional bearer-token authentication and TLS of the scoring gRPC server, by settings.

``ServerSecurity.from_settings`` reads the token list and the certificate files named by
the ``CONVEYOR_GRPC_*`` settings; a setting that names a missing or unreadable file fails
at start with the setting and the path. ``BearerTokenInterceptor`` then requires the
metadata ``authorization: Bearer <token>`` on every call except the standard health
service (``grpc.health.v1.Health``), which stays open so Kubernetes probes need no token.

Both a missing and a wrong token are answered UNAUTHENTICATED: by the gRPC status code
definitions, PERMISSION_DENIED is for a caller that *is* authenticated but may not do
the call, and "must not be used for rejections caused by failing to authenticate the
caller". Tokens are compared with ``hmac.compare_digest``. Example::

    security = ServerSecurity.from_settings(tokens="s3cret", cert_file="tls.crt",
                                            key_file="tls.key")
    server = ScoringServer(core, settings, security=security)
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca_pem))
    stub.Score(request, metadata=[("authorization", "Bearer s3cret")])
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.errors import ConveyorError, Status

OPEN_SERVICES = ("grpc.health.v1.Health",)
"""Services callable without a token (Kubernetes gRPC probes)."""


class SettingFileError(ConveyorError):
    """A security setting names a file that cannot be used."""

    status = Status.INVALID_ARGUMENT

    def __init__(self, setting: str, path: str, problem: str):
        self.setting, self.path, self.problem = setting, path, problem
        super().__init__(f"setting {setting} names {path}: {problem}")


@dataclass(frozen=True)
class ServerSecurity:
    """The accepted bearer tokens (none: no authentication) and the TLS material."""

    tokens: tuple[str, ...] = ()
    cert: bytes | None = None
    key: bytes | None = None
    client_ca: bytes | None = None
    """With it, clients must present a certificate it signed (mutual TLS)."""

    @classmethod
    def from_settings(
        cls, *, tokens: str = "", tokens_file: str = "", cert_file: str = "",
        key_file: str = "", client_ca_file: str = "",
    ) -> ServerSecurity:
        """Read the tokens (comma-separated, and/or one per line of a file) and PEM files."""
        if bool(cert_file) != bool(key_file):
            given = "CONVEYOR_GRPC_TLS_CERT" if cert_file else "CONVEYOR_GRPC_TLS_KEY"
            raise SettingFileError(
                given, cert_file or key_file,
                "TLS needs both CONVEYOR_GRPC_TLS_CERT and CONVEYOR_GRPC_TLS_KEY")
        if client_ca_file and not cert_file:
            raise SettingFileError("CONVEYOR_GRPC_TLS_CLIENT_CA", client_ca_file,
                                   "mutual TLS needs CONVEYOR_GRPC_TLS_CERT and _KEY too")
        return cls(
            tokens=_tokens(tokens, tokens_file),
            cert=_read("CONVEYOR_GRPC_TLS_CERT", cert_file),
            key=_read("CONVEYOR_GRPC_TLS_KEY", key_file),
            client_ca=_read("CONVEYOR_GRPC_TLS_CLIENT_CA", client_ca_file),
        )

    @property
    def tls(self) -> bool:
        """Whether the server listens with TLS."""
        return self.cert is not None

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS server credentials (requiring client certificates with a client CA)."""
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The token check, when tokens are configured."""
        return [BearerTokenInterceptor(self.tokens)] if self.tokens else []


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a configured bearer token, except to ``OPEN_SERVICES``."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self.tokens = [token.encode() for token in tokens]

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rsplit("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        problem = self.problem(_authorization(handler_call_details.invocation_metadata))
        return handler if problem is None else _refusing(handler, problem)

    def problem(self, authorization: str | None) -> str | None:
        """Why the call is refused, or None when its token is accepted."""
        if authorization is None:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed authorization metadata: expected 'Bearer <token>'"
        given = token.strip().encode()
        matched = False
        for accepted in self.tokens:  # no early exit: timing says nothing about which
            matched |= hmac.compare_digest(given, accepted)
        return None if matched else "invalid bearer token"


def _authorization(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _refusing(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    return grpc.stream_stream_rpc_method_handler(refuse, **serializers)


def _tokens(tokens: str, tokens_file: str) -> tuple[str, ...]:
    listed = [t.strip() for t in tokens.split(",") if t.strip()]
    if tokens_file:
        text = _read("CONVEYOR_GRPC_AUTH_TOKENS_FILE", tokens_file) or b""
        from_file = [line.strip() for line in text.decode().splitlines() if line.strip()]
        if not from_file:
            raise SettingFileError("CONVEYOR_GRPC_AUTH_TOKENS_FILE", tokens_file,
                                   "the file holds no token (one per line)")
        listed += from_file
    return tuple(listed)


def _read(setting: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingFileError(setting, path, f"cannot be read ({exc.strerror})") from exc
