"""Where an engine answers by default, and what a failed call to it means (standard library only).

Apart from :mod:`vera_plugin.connection` (which builds clients, so imports the client) because the client itself
needs both: its default address and the words for its errors.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ADDRESS", "explain_failure"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


def explain_failure(
    code: str, details: str, address: str, *, tls: bool, token_sent: bool, server_name: str | None = None
) -> str:
    """What a failed call means, first in a person's words, then gRPC's own (kept for bug reports).

    ``code`` / ``details``: the gRPC status; ``tls``: whether the client used TLS; ``token_sent``: whether it
    sent a bearer token. Covers the connection failing (engine down, TLS mismatches, an untrusted certificate, a
    certificate for another name) and the engine refusing the token.
    """
    if code == "UNAUTHENTICATED":
        if token_sent:
            return (
                f"the engine at {address} refused the token (not one of its --token-file tokens): check "
                f"--token-file / $VERA_TOKEN_FILE ({details})"
            )
        return (
            f"the engine at {address} needs a token and none was sent: give the file holding it with "
            f"--token-file or $VERA_TOKEN_FILE ({details})"
        )
    if code != "UNAVAILABLE":
        return details
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"TLS: the certificate of the engine at {address} is not trusted by this client "
            "(CERTIFICATE_VERIFY_FAILED): give the engine's certificate, or the CA that signed it, with "
            f"--ca-cert or $VERA_CA_CERT ({details})"
        )
    if "Hostname Verification" in details or "No match found for server name" in details:
        name = server_name or address.rsplit(":", 1)[0]
        return (
            f"TLS: the certificate of the engine at {address} is not for {name!r}: connect by a name the "
            f"certificate holds, or set --server-name / $VERA_SERVER_NAME to it ({details})"
        )
    if "WRONG_VERSION_NUMBER" in details or (tls and "handshake" in details.lower()):
        return (
            f"TLS: the TLS handshake with {address} failed; the engine there does not speak TLS (started without "
            f"--tls-cert/--tls-key?): connect without --tls/--ca-cert ($VERA_TLS, $VERA_CA_CERT) ({details})"
        )
    if not tls and "Socket closed" in details:
        return (
            f"the engine at {address} closed the connection at once: it probably expects TLS; connect with "
            f"--ca-cert or $VERA_CA_CERT (its certificate), or --tls / $VERA_TLS=1 for a public one ({details})"
        )
    return (
        f"no Vera engine answers at {address} ({details}); start one there with `vera-engine serve`, or check "
        "the address (--engine, $VERA_ENGINE) and whether the engine uses TLS"
    )
