"""HTTPS for every service's HTTP API: the certificates `strata up --https` makes (or is given), how a
service finds them (``STRATA_HTTP_TLS_CERT``/``STRATA_HTTP_TLS_KEY``, read by shared/service.py ``run``), and
the one way a client process (the `strata` commands) decides which CA it trusts and says when it does not.

Generated files live in ``<data_dir>/http/tls/`` and are made and kept as shared/tls.py describes. A client
trusts the CA named by ``STRATA_HTTP_CA``, else that folder's ``ca.pem`` where it exists, else the system's
roots. Plain HTTP stays the default: `strata up` serves local development on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from shared import endpoints, tls
from shared.config import data_dir_from_env
from shared.tls import ServerTls, TlsSetupError

__all__ = [
    "CA_ENV",
    "CERT_ENV",
    "KEY_ENV",
    "UNTRUSTED",
    "ServerTls",
    "TlsSetupError",
    "client_verify",
    "ensure_generated",
    "failure",
    "given",
    "health_check_verify",
    "is_loopback",
    "served",
    "server_env",
    "tls_dir",
    "trusted_ca",
]

CERT_ENV = "STRATA_HTTP_TLS_CERT"
KEY_ENV = "STRATA_HTTP_TLS_KEY"
CA_ENV = "STRATA_HTTP_CA"
WHAT = "HTTP"
UNTRUSTED = f"the server's certificate is not trusted: pass --https-ca / set {CA_ENV}"


def tls_dir(data_dir: Path) -> Path:
    return data_dir / "http" / "tls"


# -- the server side ------------------------------------------------------------------------------
def ensure_generated(data_dir: Path, host: str = "127.0.0.1") -> ServerTls:
    """The generated CA and server certificate under ``<data_dir>/http/tls/``, made where missing and kept."""
    return tls.ensure_generated(tls_dir(data_dir), host, what=WHAT)


def given(cert: Path, key: Path, ca: Path | None = None) -> ServerTls:
    return tls.given(cert, key, ca, what=WHAT)


def server_env(files: ServerTls) -> dict[str, str]:
    """What `strata up` sets for a service so that it serves HTTPS (absolute paths: a child may chdir)."""
    env = {CERT_ENV: str(files.cert.resolve()), KEY_ENV: str(files.key.resolve())}
    if files.ca is not None:
        env[CA_ENV] = str(files.ca.resolve())
    return env


def served(environ: Mapping[str, str] | None = None) -> ServerTls | None:
    """The certificate and key a service serves HTTPS with, checked (readable PEM, the key is the
    certificate's); None when neither variable is set: plain HTTP."""
    env = os.environ if environ is None else environ
    cert, key = env.get(CERT_ENV), env.get(KEY_ENV)
    if not cert and not key:
        return None
    if not cert or not key:
        raise TlsSetupError(f"{CERT_ENV} and {KEY_ENV} go together (only {CERT_ENV if cert else KEY_ENV} is set)")
    return given(Path(cert), Path(key))


# -- the client side ------------------------------------------------------------------------------
def trusted_ca(
    ca: Path | None = None, data_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """``ca``, else ``STRATA_HTTP_CA``, else the CA of what ``strata up`` serves here (shared/endpoints.py:
    generated or ``--https-ca``), else the data dir's generated ``http/tls/ca.pem`` where it exists."""
    env = os.environ if environ is None else environ
    if ca is not None:
        return ca
    if env.get(CA_ENV):
        return Path(env[CA_ENV])
    directory = data_dir or data_dir_from_env(env)
    if (served := endpoints.read(directory)) is not None and served.ca:
        return Path(served.ca)
    generated = tls_dir(directory) / "ca.pem"
    return generated if generated.is_file() else None


def client_verify(
    ca: Path | None = None, data_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> ssl.SSLContext | bool:
    """httpx's ``verify=``: a context that trusts only the CA ``trusted_ca`` finds, else True (the system's
    roots). TlsSetupError when the CA named does not exist."""
    context = tls.client_context(trusted_ca(ca, data_dir, environ), env_name=CA_ENV, what=WHAT)
    return True if context is None else context


def health_check_verify(files: ServerTls | None) -> ssl.SSLContext | bool:
    """httpx's ``verify=`` for `strata up` polling its own children's /healthz (no key is sent) at --host,
    which a certificate need not name (0.0.0.0): the chain is checked where the CA is known, never the name."""
    if files is None:
        return True
    context = ssl.create_default_context(cafile=str(files.ca) if files.ca else None)
    context.check_hostname = False
    if files.ca is None:  # a given certificate, checked against the system's roots by real clients
        context.verify_mode = ssl.CERT_NONE
    return context


def failure(exc: BaseException, url: str) -> str | None:
    """A one-line reason for the TLS failures a user can fix (an untrusted certificate; plain HTTP sent to
    an HTTPS port), None for any other transport error."""
    import httpx  # here: shared/service.py imports this module, and no service needs httpx to start

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return UNTRUSTED
        seen = seen.__cause__ or seen.__context__
    if url.startswith("http://") and isinstance(exc, httpx.RemoteProtocolError):
        return f"{url} closed the connection without an answer: if it serves HTTPS (strata up --https), use https://"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
