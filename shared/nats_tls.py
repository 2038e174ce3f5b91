"""TLS for NATS: the certificates `strata up --nats-tls` makes (or is given), nats-server's ``tls`` block,
and the one way a client process decides which CA it trusts.

Generated files live in ``<data_dir>/nats/tls/`` (a 0700 folder): ``ca.pem`` and ``ca-key.pem`` (an EC
P-256 CA, 5 years), ``server.pem`` and ``server-key.pem`` (1 year, SANs localhost, 127.0.0.1, ::1, this
host's name and the listen address). Private keys are mode 0600 from the first byte. They are made once
and kept; the server certificate alone is issued again, by the same CA, when it no longer names the
listen address or has less than 30 days left, so clients that trust the CA keep working.

Every process that connects (services, the CLI, `strata up` itself) trusts the CA named by
``STRATA_NATS_CA`` (a PEM path), which `strata up` sets for its children.
"""

from __future__ import annotations

import ipaddress
import json
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

CA_ENV = "STRATA_NATS_CA"
CA_VALID = timedelta(days=5 * 365)
SERVER_VALID = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)
HANDSHAKE_TIMEOUT_S = 5.0  # nats-server's default (0.5 s) is too short for a loaded 2-core machine


class TlsSetupError(ValueError):
    """Certificates that cannot be used, with the reason and the file."""


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    ca: Path | None  # what clients should trust; None: the system's roots


def tls_dir(data_dir: Path) -> Path:
    return data_dir / "nats" / "tls"


# -- the client side -----------------------------------------------------------------------------
def client_context(ca: str | Path | None = None, *, environ: dict[str, str] | None = None) -> ssl.SSLContext | None:
    """An SSL context that trusts ``ca`` (or, when None, the CA named by ``STRATA_NATS_CA``) and no other
    root; None when neither is set (then a server that requires TLS is checked against the system roots)."""
    env = os.environ if environ is None else environ
    path = ca or env.get(CA_ENV)
    if not path:
        return None
    if not Path(path).is_file():
        raise TlsSetupError(f"the NATS CA certificate {path} does not exist (set {CA_ENV} to a PEM file)")
    return ssl.create_default_context(cafile=str(path))


# -- nats-server's side ---------------------------------------------------------------------------
def server_block(tls: ServerTls, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """The ``tls`` block: with it nats-server requires TLS of every client connection."""
    return (f"tls {{\n  cert_file: {json.dumps(str(tls.cert.resolve()))}\n"
            f"  key_file: {json.dumps(str(tls.key.resolve()))}\n  timeout: {timeout_s}\n}}\n")


def given(cert: Path, key: Path, ca: Path | None = None) -> ServerTls:
    """Certificates the operator brings: readable PEM, and the key belongs to the certificate."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if ca is not None:
            x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise TlsSetupError(f"cannot use the NATS TLS files ({cert}, {key}{', ' + str(ca) if ca else ''}): {exc}") from None
    if _public(certificate.public_key()) != _public(private.public_key()):
        raise TlsSetupError(f"the key {key} does not belong to the certificate {cert}")
    return ServerTls(cert=cert, key=key, ca=ca)


def ensure_generated(data_dir: Path, host: str = "127.0.0.1") -> ServerTls:
    """The generated CA and server certificate, made where missing and otherwise kept (see the module)."""
    folder = tls_dir(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    files = ServerTls(cert=folder / "server.pem", key=folder / "server-key.pem", ca=folder / "ca.pem")
    ca_key_path = folder / "ca-key.pem"
    now = datetime.now(timezone.utc)
    names = _server_names(host)
    ca_cert, ca_key = _load_pair(files.ca, ca_key_path)
    if ca_cert is None or ca_cert.not_valid_after_utc - now < RENEW_BEFORE:
        ca_cert, ca_key = _make_ca(now)
        write_private(ca_key_path, _key_pem(ca_key))
        _write_public(files.ca, ca_cert)
    elif _server_cert_fits(files, ca_cert, names, now):
        return files
    assert ca_key is not None
    server_cert, server_key = _make_server(ca_cert, ca_key, names, now)
    write_private(files.key, _key_pem(server_key))
    _write_public(files.cert, server_cert)
    return files


def _server_names(host: str) -> list[str]:
    return list(dict.fromkeys(["localhost", "127.0.0.1", "::1", socket.gethostname(), host]))


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


def _make_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"Strata NATS CA {socket.gethostname()}"[:64])  # X.509 caps a common name at 64
    cert = (
        _builder(name, name, key.public_key(), now, CA_VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str],
                 now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name("strata nats-server"), ca_cert.subject, key.public_key(), now, SERVER_VALID)
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime,
             valid: timedelta) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # a little clock skew between machines
        .not_valid_after(now + valid)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strata"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _write_public(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)
