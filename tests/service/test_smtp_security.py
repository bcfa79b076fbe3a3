"""SMTP_SECURITY=starttls and ssl with SMTP_USER/SMTP_PASSWORD against a real TLS mail server
whose self-signed certificate the service trusts through SSL_CERT_FILE (verification stays on)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from .conftest import Mailbox, free_port, http, verify_link

USER, PASSWORD = "mailer", "s3cret"


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # it is TLS, see below
@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_tls_and_login(service_process, tmp_path, certificate, security):
    cert, context = certificate
    mailbox, port = Mailbox(), free_port()
    # aiosmtpd counts only STARTTLS as TLS for its AUTH rule; with implicit TLS the link is TLS anyway.
    tls = (
        {"ssl_context": context, "auth_require_tls": False}
        if security == "ssl"
        else {"tls_context": context, "require_starttls": True}
    )
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        server_hostname="localhost",
        authenticator=authenticate,
        auth_required=True,
        **tls,
    )
    controller.start()
    try:
        server = service_process(
            {
                "DATABASE_URL": f"sqlite:///{tmp_path / 'tls.db'}",
                "SSL_CERT_FILE": str(cert),
                "SMTP_HOST": "localhost",
                "SMTP_PORT": str(port),
                "SMTP_SECURITY": security,
                "SMTP_USER": USER,
                "SMTP_PASSWORD": PASSWORD,
            }
        )
        assert http("POST", f"{server.url}/api/v1/api-keys/generation", {"email": "tls@example.org"})[0] == 200
        assert "verify?token=" in verify_link(mailbox.wait_for(1)[0])
    finally:
        controller.stop()
