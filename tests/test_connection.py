"""One set of connection settings for every client (vera_plugin.connection), and connection failures said as
what they are: an untrusted certificate, a certificate for another name, TLS on one side only, a missing or
refused token."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest

from vera_engine.service import Engine, create_server
from vera_engine.service.testing import PassThroughRunner
from vera_plugin import cli
from vera_plugin.connection import ConnectionSettings, connection_settings, engine_address
from vera_plugin.generate import client_options_from_env

pytestmark = pytest.mark.timeout(120)

_CONNECTION_VARIABLES = ("VERA_ENGINE", "VERA_TOKEN_FILE", "VERA_CA_CERT", "VERA_TLS", "VERA_SERVER_NAME")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _CONNECTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vera-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def engines(tmp_path: Path):
    """A TLS engine with a token (self-signed certificate) and a plain one with the same token."""
    cert, key = self_signed(tmp_path / "tls")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    started = []
    addresses = {}
    for name, tls in (("tls", (cert, key)), ("plain", None)):
        engine = Engine(tmp_path / f"spool-{name}", PassThroughRunner())
        server, port = create_server(engine, "127.0.0.1", 0, tokens=["s3cret"], tls=tls)
        engine.start()
        server.start()
        started.append((engine, server))
        addresses[name] = f"127.0.0.1:{port}"
    yield {
        **addresses,
        "cert": str(cert),
        "token": str(token),
        "other_cert": str(self_signed(tmp_path / "o")[0]),
    }
    for engine, server in started:
        server.stop(0).wait()
        engine.stop()


def test_settings_come_from_flags_else_the_environment_else_defaults(tmp_path: Path) -> None:
    assert connection_settings(env={}) == ConnectionSettings("127.0.0.1:50051")
    env = {
        "VERA_ENGINE": "gpu-box:50051",
        "VERA_TOKEN_FILE": "/tokens/vera",
        "VERA_CA_CERT": "/certs/ca.pem",
        "VERA_SERVER_NAME": "vera.studio",
        "VERA_TLS": "0",
    }
    settings = connection_settings(env=env)
    assert settings == ConnectionSettings(
        "gpu-box:50051", "/tokens/vera", "/certs/ca.pem", False, "vera.studio"
    )
    assert settings.uses_tls  # a CA certificate turns TLS on
    assert settings.client_options() == {
        "token_file": "/tokens/vera",
        "ca_cert": "/certs/ca.pem",
        "server_name": "vera.studio",
    }
    # A flag (or a host's address field) wins; a blank one does not count.
    assert connection_settings("other:1", token_file="/t2", env=env).address == "other:1"
    assert connection_settings("other:1", token_file="/t2", env=env).token_file == "/t2"
    assert connection_settings("  ", env=env).address == "gpu-box:50051" == engine_address("", env)
    assert connection_settings(env={"VERA_TLS": "yes"}).client_options() == {"tls": True}
    with pytest.raises(ValueError, match=r"\$VERA_TLS='maybe'; expected 1 or 0"):
        connection_settings(env={"VERA_TLS": "maybe"})
    # The Nuke node and the Resolve window read the same settings (generate.client_options_from_env).
    assert client_options_from_env(env) == settings.client_options()


def test_settings_that_cannot_work_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"token file '/nowhere/token' \(from --token-file or \$VERA_TOKEN_FILE\)"
    ):
        connection_settings(env={"VERA_TOKEN_FILE": "/nowhere/token"}).check()
    with pytest.raises(ValueError, match=r"ca cert '/nowhere/ca.pem' \(from --ca-cert or \$VERA_CA_CERT\)"):
        connection_settings(env={"VERA_CA_CERT": "/nowhere/ca.pem"}).check()
    with pytest.raises(ValueError, match="applies to TLS only"):
        connection_settings(env={"VERA_SERVER_NAME": "gpu-box"}).check()


def test_the_cli_reaches_a_tls_engine_from_the_environment(
    engines, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VERA_ENGINE", engines["tls"])
    monkeypatch.setenv("VERA_CA_CERT", engines["cert"])
    monkeypatch.setenv("VERA_TOKEN_FILE", engines["token"])
    assert cli.main(["info"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"engine   {engines['tls']} over TLS (CA {engines['cert']}), token from {engines['token']}" in out
    # The certificate names 127.0.0.1 and localhost: connecting by another name needs --server-name.
    assert cli.main(["info", "--server-name", "localhost"]) == cli.EXIT_OK
    capsys.readouterr()


@pytest.mark.parametrize(
    ("case", "exit_code", "starts", "says"),
    [
        (
            "no CA: system roots",
            cli.EXIT_UNREACHABLE,
            "TLS: the certificate",
            "is not trusted by this client",
        ),
        (
            "another CA",
            cli.EXIT_UNREACHABLE,
            "TLS: the certificate",
            "or the CA that signed it, with --ca-cert",
        ),
        (
            "certificate for another name",
            cli.EXIT_UNREACHABLE,
            "TLS: the certificate",
            "is not for 'gpu-box'",
        ),
        ("TLS to a plain engine", cli.EXIT_UNREACHABLE, "TLS: the TLS handshake", "does not speak TLS"),
        ("plain to a TLS engine", cli.EXIT_UNREACHABLE, "the engine at", "it probably expects TLS"),
        ("no token", cli.EXIT_UNAUTHENTICATED, "the engine at", "needs a token and none was sent"),
        ("wrong token", cli.EXIT_UNAUTHENTICATED, "the engine at", "refused the token"),
        ("no engine", cli.EXIT_UNREACHABLE, "no Vera engine answers at 127.0.0.1:1", "start one there"),
    ],
)
def test_connection_failures_are_said_as_what_they_are(
    engines,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    exit_code: int,
    starts: str,
    says: str,
) -> None:
    wrong_token = tmp_path / "wrong-token"
    wrong_token.write_text("guess\n")
    tls, plain, cert, token = engines["tls"], engines["plain"], engines["cert"], engines["token"]
    args = {
        "no CA: system roots": ["--engine", tls, "--tls", "--token-file", token],
        "another CA": ["--engine", tls, "--ca-cert", engines["other_cert"], "--token-file", token],
        "certificate for another name": ["--engine", tls, "--ca-cert", cert, "--server-name", "gpu-box"],
        "TLS to a plain engine": ["--engine", plain, "--ca-cert", cert, "--token-file", token],
        "plain to a TLS engine": ["--engine", tls, "--token-file", token],
        "no token": ["--engine", tls, "--ca-cert", cert],
        "wrong token": ["--engine", tls, "--ca-cert", cert, "--token-file", str(wrong_token)],
        "no engine": ["--engine", "127.0.0.1:1"],
    }[case]
    assert cli.main(["info", "--timeout", "5", *args]) == exit_code
    error = capsys.readouterr().err
    # What happened comes first, in a person's words; gRPC's own follow in brackets.
    assert error.split(": ", 3)[-1].startswith(starts), error
    assert says in error, error


def test_the_panel_connects_with_the_same_settings(qtbot, engines, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PySide6.QtWidgets")
    import shiboken6

    from vera_plugin.panel import VeraPanel

    monkeypatch.setenv("VERA_ENGINE", engines["tls"])
    monkeypatch.setenv("VERA_CA_CERT", engines["cert"])
    monkeypatch.setenv("VERA_TOKEN_FILE", engines["token"])
    widget = VeraPanel(poll_ms=100000)
    try:
        assert widget.address == engines["tls"]

        # The panel's own timer delivers its threads' results; pumped here too, so that this test does not depend
        # on what earlier tests left of the QApplication's event loop (`vera panel --screenshot` quits it).
        def delivered(done) -> bool:
            widget._deliver()
            return done()

        qtbot.waitUntil(lambda: delivered(lambda: bool(widget.fields)), timeout=30000)
        assert widget.engine_status.text().startswith("● ready")
        monkeypatch.delenv("VERA_CA_CERT")
        with widget._client_lock:  # as after a restart without the setting
            widget._engine_client.close()
            widget._engine_client = None
        widget.connect_engine()
        qtbot.waitUntil(
            lambda: delivered(lambda: "probably expects TLS" in widget.message.text()), timeout=30000
        )
    finally:
        widget.close()
        widget.wait_idle()
        shiboken6.delete(widget)
