"""How every client reaches an engine: one set of settings for the ``vera`` CLI, the Qt panel, the Nuke node and
the Resolve window, and the words for what went wrong when the connection fails.

A setting given explicitly (a command-line flag, a host's address field) wins; otherwise it comes from the
environment:

==================  =====================================================================================
``VERA_ENGINE``     the engine's ``host:port`` (default ``127.0.0.1:50051``)
``VERA_TOKEN_FILE`` file holding the bearer token of an engine started with ``--token-file``
``VERA_CA_CERT``    PEM certificate (or its CA) to verify a TLS engine with; setting it turns TLS on
``VERA_TLS``        ``1`` for TLS verified against the system's roots (an engine with a public certificate)
``VERA_SERVER_NAME`` the name the engine's certificate holds, when it is not the address's host
==================  =====================================================================================

Hosts build a client with ``connection_settings(address=typed_address).connect(timeout=...)``, or pass
``connection_settings().client_options()`` to :class:`~vera_plugin.client.EngineClient` themselves.
Needs only the standard library (the client is imported when a connection is made).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vera_plugin.address import DEFAULT_ADDRESS, explain_failure

if TYPE_CHECKING:
    from vera_plugin.client import EngineClient

__all__ = [
    "DEFAULT_ADDRESS",
    "ENVIRONMENT",
    "ConnectionSettings",
    "connection_settings",
    "engine_address",
    "explain_failure",
]


# Setting -> the environment variable it is read from.
ENVIRONMENT = {
    "address": "VERA_ENGINE",
    "token_file": "VERA_TOKEN_FILE",
    "ca_cert": "VERA_CA_CERT",
    "tls": "VERA_TLS",
    "server_name": "VERA_SERVER_NAME",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the engine is and how to authenticate to it (see the module docstring)."""

    address: str = DEFAULT_ADDRESS
    token_file: str | None = None
    ca_cert: str | None = None
    tls: bool = False
    server_name: str | None = None

    @property
    def uses_tls(self) -> bool:
        """TLS is on: asked for, or implied by a CA certificate."""
        return self.tls or self.ca_cert is not None

    def check(self) -> None:
        """Refuse settings that cannot work, naming the setting: a token or CA file that is not there."""
        for name, path in (("token_file", self.token_file), ("ca_cert", self.ca_cert)):
            if path is not None and not os.path.isfile(path):
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{name.replace('_', ' ')} {path!r} (from {flag} or ${ENVIRONMENT[name]}) does not exist; "
                    "give the path of the file"
                )
        if self.server_name is not None and not self.uses_tls:
            raise ValueError(
                f"server name {self.server_name!r} (--server-name or $VERA_SERVER_NAME) applies to TLS only; "
                "also give --ca-cert ($VERA_CA_CERT) or --tls ($VERA_TLS=1)"
            )

    def client_options(self) -> dict[str, Any]:
        """``EngineClient`` keyword arguments (everything but the address), only those that are set."""
        options: dict[str, Any] = {}
        if self.token_file is not None:
            options["token_file"] = self.token_file
        if self.ca_cert is not None:
            options["ca_cert"] = self.ca_cert
        if self.tls:
            options["tls"] = True
        if self.server_name is not None:
            options["server_name"] = self.server_name
        return options

    def connect(self, **client_kwargs: Any) -> EngineClient:
        """An ``EngineClient`` with these settings (after :meth:`check`); ``client_kwargs`` e.g. ``timeout``."""
        from vera_plugin.client import EngineClient

        self.check()
        return EngineClient(self.address, **self.client_options(), **client_kwargs)

    def describe(self) -> str:
        """``gpu-box:50051 over TLS (CA ca.pem), token from ~/.vera-token`` for status lines and logs."""
        text = self.address
        if self.uses_tls:
            text += f" over TLS ({'CA ' + self.ca_cert if self.ca_cert else 'system roots'}"
            text += f", as {self.server_name})" if self.server_name else ")"
        if self.token_file:
            text += f", token from {self.token_file}"
        return text


def _flag(name: str, value: str) -> bool:
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"${name}={value!r}; expected 1 or 0 (also true/false, yes/no, on/off)")


def engine_address(address: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The engine address: ``address`` if given (not blank), else ``$VERA_ENGINE``, else the default."""
    env = os.environ if env is None else env
    return (address or "").strip() or env.get(ENVIRONMENT["address"], "").strip() or DEFAULT_ADDRESS


def connection_settings(
    address: str | None = None,
    *,
    token_file: str | os.PathLike[str] | None = None,
    ca_cert: str | os.PathLike[str] | None = None,
    tls: bool | None = None,
    server_name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ConnectionSettings:
    """The settings to connect with: each argument that is given (not None, not blank), else its environment
    variable, else the default. ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env

    def pick(name: str, given: Any) -> str | None:
        if given is not None and str(given).strip():
            return os.fspath(given).strip()
        value = env.get(ENVIRONMENT[name], "").strip()
        return value or None

    return ConnectionSettings(
        address=engine_address(address, env),
        token_file=pick("token_file", token_file),
        ca_cert=pick("ca_cert", ca_cert),
        tls=bool(tls) if tls is not None else _flag("VERA_TLS", env.get("VERA_TLS", "")),
        server_name=pick("server_name", server_name),
    )
