"""The certificates Strata makes for itself (or is given), for every transport that needs TLS: NATS
(shared/nats_tls.py) and the HTTP APIs (shared/http_tls.py) each keep their own folder and CA.

A generated folder (0700) holds ``ca.pem`` and ``ca-key.pem`` (an EC P-256 CA, 5 years), ``server.pem`` and
``server-key.pem`` (1 year, SANs localhost, 127.0.0.1, ::1, this host's name and the listen address).
Private keys are mode 0600 from the first byte. They are made once and kept; the server certificate alone
is issued again, by the same CA, when it no longer names the listen address or has less than 30 days left,
so clients that trust the CA keep working.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.nats_auth import write_private

CA_VALID = timedelta(days=5 * 365)
SERVER_VALID = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)
UNSPECIFIED = {"0.0.0.0", "::", ""}  # "every address": no client connects to it by that name


class TlsSetupError(ValueError):
    """Certificates that cannot be used, with the reason and the file."""


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    ca: Path | None  # what clients should trust; None: the system's roots


def client_context(ca: str | Path | None, *, env_name: str, what: str) -> ssl.SSLContext | None:
    """An SSL context that trusts ``ca`` and no other root; None when ``ca`` is None (the system's roots)."""
    if not ca:
        return None
    if not Path(ca).is_file():
        raise TlsSetupError(f"the {what} CA certificate {ca} does not exist (set {env_name} to a PEM file)")
    return ssl.create_default_context(cafile=str(ca))


def given(cert: Path, key: Path, ca: Path | None = None, *, what: str) -> ServerTls:
    """Certificates the operator brings: readable PEM, and the key belongs to the certificate."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if ca is not None:
            x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise TlsSetupError(
            f"cannot use the {what} TLS files ({cert}, {key}{', ' + str(ca) if ca else ''}): {exc}"
        ) from None
    if _public(certificate.public_key()) != _public(private.public_key()):
        raise TlsSetupError(f"the key {key} does not belong to the certificate {cert}")
    return ServerTls(cert=cert, key=key, ca=ca)


def ensure_generated(folder: Path, host: str = "127.0.0.1", *, what: str) -> ServerTls:
    """The generated CA and server certificate in ``folder``, made where missing and otherwise kept (see the
    module). ``what`` names the CA and the server certificate ("NATS", "HTTP")."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    files = ServerTls(cert=folder / "server.pem", key=folder / "server-key.pem", ca=folder / "ca.pem")
    ca_key_path = folder / "ca-key.pem"
    now = datetime.now(timezone.utc)
    names = _server_names(host)
    ca_cert, ca_key = _load_pair(files.ca, ca_key_path)
    if ca_cert is None or ca_cert.not_valid_after_utc - now < RENEW_BEFORE:
        ca_cert, ca_key = _make_ca(now, what)
        write_private(ca_key_path, _key_pem(ca_key))
        _write_public(files.ca, ca_cert)
    elif _server_cert_fits(files, ca_cert, names, now):
        return files
    assert ca_key is not None
    server_cert, server_key = _make_server(ca_cert, ca_key, names, now, what)
    write_private(files.key, _key_pem(server_key))
    _write_public(files.cert, server_cert)
    return files


def _server_names(host: str) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), host]
    return [name for name in dict.fromkeys(names) if name not in UNSPECIFIED]


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _server_cert_fits(files: ServerTls, ca_cert: x509.Certificate, names: list[str], now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, x509.InvalidSignature):
        return False
    return set(_san(names)) <= set(present) and cert.not_valid_after_utc - now >= RENEW_BEFORE


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate | None, ec.EllipticCurvePrivateKey | None]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None, None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _public(cert.public_key()) != _public(key.public_key()):
        return None, None
    return cert, key


def _make_ca(now: datetime, what: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"Strata {what} CA {socket.gethostname()}"[:64])  # X.509 caps a common name at 64
    cert = (
        _builder(name, name, key.public_key(), now, CA_VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str], now: datetime, what: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(f"strata {what} server"), ca_cert.subject, key.public_key(), now, SERVER_VALID)
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime, valid: timedelta
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # a little clock skew between machines
        .not_valid_after(now + valid)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strata"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _write_public(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)
