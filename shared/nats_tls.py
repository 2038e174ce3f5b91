"""TLS for NATS: the certificates `strata up --nats-tls` makes (or is given), nats-server's ``tls`` block,
and the one way a client process decides which CA it trusts.

Generated files live in ``<data_dir>/nats/tls/``; how they are made and kept is shared with HTTPS
(shared/tls.py). Every process that connects (services, the CLI, `strata up` itself) trusts the CA named by
``STRATA_NATS_CA`` (a PEM path), which `strata up` sets for its children.
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

from shared import tls
from shared.tls import CA_VALID, RENEW_BEFORE, SERVER_VALID, ServerTls, TlsSetupError

__all__ = ["CA_ENV", "CA_VALID", "HANDSHAKE_TIMEOUT_S", "RENEW_BEFORE", "SERVER_VALID", "ServerTls", "TlsSetupError",
           "client_context", "ensure_generated", "given", "server_block", "tls_dir"]

CA_ENV = "STRATA_NATS_CA"
HANDSHAKE_TIMEOUT_S = 5.0  # nats-server's default (0.5 s) is too short for a loaded 2-core machine
WHAT = "NATS"


def tls_dir(data_dir: Path) -> Path:
    return data_dir / "nats" / "tls"


# -- the client side -----------------------------------------------------------------------------
def client_context(ca: str | Path | None = None, *, environ: dict[str, str] | None = None) -> ssl.SSLContext | None:
    """An SSL context that trusts ``ca`` (or, when None, the CA named by ``STRATA_NATS_CA``) and no other
    root; None when neither is set (then a server that requires TLS is checked against the system roots)."""
    env = os.environ if environ is None else environ
    return tls.client_context(ca or env.get(CA_ENV), env_name=CA_ENV, what=WHAT)


# -- nats-server's side ---------------------------------------------------------------------------
def server_block(files: ServerTls, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """The ``tls`` block: with it nats-server requires TLS of every client connection."""
    return (f"tls {{\n  cert_file: {json.dumps(str(files.cert.resolve()))}\n"
            f"  key_file: {json.dumps(str(files.key.resolve()))}\n  timeout: {timeout_s}\n}}\n")


def given(cert: Path, key: Path, ca: Path | None = None) -> ServerTls:
    """Certificates the operator brings: readable PEM, and the key belongs to the certificate."""
    return tls.given(cert, key, ca, what=WHAT)


def ensure_generated(data_dir: Path, host: str = "127.0.0.1") -> ServerTls:
    """The generated CA and server certificate under ``<data_dir>/nats/tls/``, made where missing and kept."""
    return tls.ensure_generated(tls_dir(data_dir), host, what=WHAT)
