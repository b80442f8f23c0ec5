"""An agent's TLS identity: a self-signed certificate, pinned by its fingerprint.

Every site agent has one key pair (ECDSA P-256) and a self-signed certificate
made with ``cryptography`` at ``agent init``; it serves both its control API
(to the engine) and its wire port (to other agents) with it. Peers never trust
a CA: they *pin* the certificate. The engine learns the fingerprint from the
join token (out of band, from the administrator), checks the certificate the
agent presents against it once, and from then on trusts that one certificate
as the only anchor (:func:`client_context`). An agent reaching another agent
gets that agent's certificate from the engine, over the authenticated control
channel, with the transfer it is told to make.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from siterecovery.domain.errors import AgentCertificateMismatch, AgentUnreachable

CERT_FILE = "agent.crt"
KEY_FILE = "agent.key"
VALIDITY_DAYS = 3650


@dataclass(frozen=True, slots=True)
class Identity:
    """Where an agent's certificate and key live, and the certificate's pin."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> str:
        return self.cert.read_text()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


def make_identity(directory: Path, common_name: str) -> Identity:
    """Create (once) a key pair and a self-signed certificate in ``directory``.

    Idempotent: an existing identity is returned as it is. The key file is 0600.
    """
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity(directory / CERT_FILE, directory / KEY_FILE)
    if identity.cert.exists() and identity.key.exists():
        return identity
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(identity.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return identity


def fingerprint(cert_pem: str) -> str:
    """``sha256:HEX`` of the certificate's DER bytes."""
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def server_context(identity: Identity) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.cert, identity.key)
    return context


def client_context(cert_pem: str) -> ssl.SSLContext:
    """A client context trusting exactly one certificate (the pinned peer's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The peer is identified by its pinned certificate, not by a host name:
    # the same agent is reached by address (10.0.0.2, 127.0.0.1, a NAT...).
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_pem)
    return context


def fetch_pinned(
    host: str, port: int, expected: str, timeout: float = 10.0, *, site: str = "?"
) -> str:
    """The certificate (PEM) an agent presents, if its fingerprint is ``expected``.

    The one connection that does not verify the chain: it only reads the
    certificate, compares it with the pin the administrator gave, and sends
    nothing. Raises AgentCertificateMismatch when it differs (another machine
    answers), AgentUnreachable (naming ``site``) when nothing answers.
    """
    pem = peer_certificate(host, port, timeout, site=site)
    got = fingerprint(pem) if pem else "none"
    if got != expected:
        raise AgentCertificateMismatch(url=f"{host}:{port}", got=got, expected=expected)
    return pem


def peer_certificate(host: str, port: int, timeout: float = 10.0, *, site: str = "?") -> str:
    """The certificate (PEM, "" if none) presented at ``host:port``, unverified:
    only to compare it with a pin or to name it in an error."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as e:
        raise AgentUnreachable(site=site, url=f"{host}:{port}", detail=str(e)) from e
    return ssl.DER_cert_to_PEM_cert(der) if der else ""
