"""Who may talk to the engine: the bind policy, bearer tokens checked in an interceptor, TLS credentials.

Loopback binds need nothing. Any other bind needs a token file and TLS, unless the operator passes
``--insecure`` (an explicit, logged decision, e.g. behind a trusted VPN): then without tokens, since a token in
plain text is readable by anyone on the network. Token files must be the engine user's alone (mode 0600) and
hold tokens of at least :data:`MIN_TOKEN_CHARS` characters. docs/SECURITY.md has the whole trust model.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

# Health checks carry no data and load balancers probe them without credentials.
PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class PolicyError(ValueError):
    """The requested bind is not allowed with the given security options."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_policy(
    host: str, token_file: Path | None, tls_cert: Path | None, tls_key: Path | None, insecure: bool
) -> None:
    """Refuse a non-loopback bind without token and TLS (unless ``insecure``); check file arguments."""
    if (tls_cert is None) != (tls_key is None):
        raise PolicyError("--tls-cert and --tls-key go together; pass both (PEM files) or neither")
    for flag, path in (("--token-file", token_file), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not Path(path).is_file():
            raise PolicyError(f"{flag} {path}: file not found")
    if is_loopback(host):
        return
    if insecure and token_file is not None and tls_cert is None:
        # The tokens would cross the network in plain text, readable by anyone on the path and replayable.
        raise PolicyError(
            f"--host {host} with --insecure and --token-file would accept bearer tokens in plain text from "
            "other machines, where anyone on the network can read and replay them; add --tls-cert/--tls-key, "
            "or bind to 127.0.0.1 behind a TLS-terminating proxy or SSH tunnel"
        )
    if insecure:
        return
    missing = [f for f, v in (("--token-file", token_file), ("--tls-cert/--tls-key", tls_cert)) if v is None]
    if missing:
        raise PolicyError(
            f"--host {host} is reachable from other machines, so the engine needs {' and '.join(missing)}; "
            "pass them, bind to 127.0.0.1, or pass --insecure to accept unauthenticated plain-text access"
        )


def read_tokens(path: Path) -> list[str]:
    """Tokens from a file, one per line (several allow rotation); blank lines and '#' comments ignored."""
    tokens = [line.strip() for line in Path(path).read_text().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise PolicyError(f"--token-file {path}: contains no token (one per line)")
    return tokens


MIN_TOKEN_CHARS = 32  # e.g. `python -c "import secrets; print(secrets.token_hex(32))"` (64 characters)


def load_tokens(path: Path) -> list[str]:
    """The engine's tokens from ``--token-file``, refused if others can read the file or a token is short.

    A token file readable by the group or others gives the engine to every local user who can read it; a
    short token can be guessed. Raises PolicyError saying what to change.
    """
    path = Path(path)
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PolicyError(
                f"--token-file {path}: readable or writable by others (mode {mode:04o}); "
                f"make it the engine user's alone: chmod 600 {path}"
            )
    tokens = read_tokens(path)
    short = [i for i, token in enumerate(tokens, start=1) if len(token) < MIN_TOKEN_CHARS]
    if short:
        raise PolicyError(
            f"--token-file {path}: token {short[0]} is shorter than {MIN_TOKEN_CHARS} characters; use a long random "
            'token, e.g. python -c "import secrets; print(secrets.token_hex(32))"'
        )
    return tokens


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM certificate chain and private key files."""
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that answers UNAUTHENTICATED."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` matching one of ``tokens``."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer":
                    # compare_digest on every token: no early exit that leaks which prefix matched.
                    return any([hmac.compare_digest(token.encode(), t) for t in self._tokens])
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass authorised calls through; answer the others UNAUTHENTICATED."""
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in PUBLIC_METHODS:
            return handler
        if self._allowed(handler_call_details.invocation_metadata):
            return handler
        return _abort_handler(
            handler, "missing or wrong token: send 'authorization: Bearer <token>' (vera --token-file FILE)"
        )
