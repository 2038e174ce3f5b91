"""NATS transport security as `strata up` sets it up: TLS (generated or given certificates, shared/nats_tls.py)
and no anonymous connections, against a real nats-server started with the config `strata up` writes
(cli/natsd.py config). Services trust the CA through STRATA_NATS_CA; the CLI finds its credential and the
CA in the data dir (cli/connection.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cli import connection, natsd
from cli import main as cli_main
from cli.up import Supervisor
from cli.up_options import UpOptions
from shared import errors, nats_tls, subjects
from shared.events import DeployRequested, Source, make_event
from tests.security.conftest import SecuredNats
from tests.support.helpers import eventually, make_service
from tests.support.up import Up

pytestmark = pytest.mark.timeout(180)
LEDGER = "provenance-ledger"


class UpNats(SecuredNats):
    """nats-server with exactly the config `strata up` starts it with: a user per service, no anonymous
    connections, and TLS when ``tls`` is given."""

    def __init__(self, data_dir: Path, tls: nats_tls.ServerTls | None = None) -> None:
        super().__init__(data_dir)
        self.config = natsd.config(data_dir, secure=True, tls=tls)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def tls_nats(data_dir: Path, monkeypatch):
    """TLS + auth; the process trusts the generated CA the way `strata up` tells its children."""
    tls = nats_tls.ensure_generated(data_dir)
    monkeypatch.setenv(nats_tls.CA_ENV, str(tls.ca))
    server = UpNats(data_dir, tls).start().provision()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def auth_nats(data_dir: Path, monkeypatch):
    monkeypatch.delenv(nats_tls.CA_ENV, raising=False)
    server = UpNats(data_dir).start().provision()
    try:
        yield server
    finally:
        server.stop()


async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the certificates -------------------------------------------------------------------------
def test_generated_certificates_are_private_kept_and_reissued_only_for_a_new_address(tmp_path):
    first = nats_tls.ensure_generated(tmp_path, host="127.0.0.1")
    folder = nats_tls.tls_dir(tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for key in (first.key, folder / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate(first.ca.read_bytes())
    server = x509.load_pem_x509_certificate(first.cert.read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 4 * 365
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]

    before = {p: p.read_bytes() for p in folder.glob("*.pem")}
    again = nats_tls.ensure_generated(tmp_path, host="127.0.0.1")  # a second `strata up`
    assert again == first and {p: p.read_bytes() for p in folder.glob("*.pem")} == before

    moved = nats_tls.ensure_generated(tmp_path, host="10.1.2.3")  # --host changed: same CA, a new server cert
    assert moved.ca.read_bytes() == before[first.ca] and moved.cert.read_bytes() != before[first.cert]
    reissued = x509.load_pem_x509_certificate(moved.cert.read_bytes())
    reissued.verify_directly_issued_by(ca)
    names = reissued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert stat.S_IMODE(moved.key.stat().st_mode) == 0o600


def test_given_certificates_are_checked_and_used_instead(tmp_path):
    own = nats_tls.ensure_generated(tmp_path / "elsewhere")
    other = nats_tls.ensure_generated(tmp_path / "another")
    options = UpOptions(data_dir=tmp_path / "data", nats_tls_cert=own.cert, nats_tls_key=own.key, nats_tls_ca=own.ca)
    supervisor = Supervisor(options)
    tls = supervisor._server_tls()
    assert tls == nats_tls.ServerTls(cert=own.cert, key=own.key, ca=own.ca) and supervisor.nats_ca == own.ca
    config = natsd.config(options.data_dir, secure=True, tls=tls)
    assert json.dumps(str(own.cert.resolve())) in config.read_text()
    assert not nats_tls.tls_dir(options.data_dir).exists(), "nothing generated when certificates are given"

    with pytest.raises(nats_tls.TlsSetupError, match="does not belong to the certificate"):
        nats_tls.given(own.cert, other.key)
    with pytest.raises(nats_tls.TlsSetupError, match="cannot use the NATS TLS files"):
        nats_tls.given(tmp_path / "missing.pem", own.key)
    assert (
        UpOptions(data_dir=tmp_path, nats_tls_cert=own.cert).problem()
        == "--nats-tls-cert and --nats-tls-key go together"
    )
    assert "--nats-tls-ca" in UpOptions(data_dir=tmp_path, nats_url="nats://h:4222", nats_tls=True).problem()
    with pytest.raises(nats_tls.TlsSetupError, match="does not exist"):
        nats_tls.client_context(tmp_path / "no-ca.pem")


async def test_given_certificates_serve_clients_that_trust_their_ca(tmp_path, monkeypatch):
    own = nats_tls.ensure_generated(tmp_path / "issuer", host="127.0.0.1")
    given = nats_tls.given(own.cert, own.key, own.ca)
    monkeypatch.delenv(nats_tls.CA_ENV, raising=False)
    server = UpNats(tmp_path / "data", given).start()
    try:
        nc = await nats.connect(
            server.url_for("client"), tls=nats_tls.client_context(own.ca), allow_reconnect=False, connect_timeout=5
        )
        assert nc.is_connected
        await nc.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # a CA that did not sign the given certificate
            await nats.connect(
                server.url_for("client"),
                allow_reconnect=False,
                connect_timeout=5,
                tls=nats_tls.client_context(nats_tls.ensure_generated(tmp_path / "stranger").ca),
            )
    finally:
        server.stop()


# -- TLS on a real server ---------------------------------------------------------------------
async def test_a_service_publishes_and_consumes_over_tls_and_the_cli_works_from_the_data_dir(
    tls_nats, data_dir, capsys
):
    service = make_service(LEDGER, tls_nats.url_for(LEDGER), data_dir / "services")
    async with service.running():
        client = await connection.connect(tls_nats.url, data_dir, allow_reconnect=False)  # client.json + ca.pem
        try:
            event = make_event(DeployRequested(model_ref="tiny"), Source(service="cli", node="node-t"))
            await client.jetstream().publish(
                event.subject, event.to_bytes(), headers={"Nats-Msg-Id": event.id}, timeout=10
            )
            code, out, err = await cli(
                capsys, "ledger", "head", "--sign", "--json", "--nats-url", tls_nats.url, "--data-dir", str(data_dir)
            )
            assert code == 0, err
            assert json.loads(out)["tree_size"] >= 1  # the service consumed the event over TLS
            checkpoints = await client.jetstream().pull_subscribe(
                "evt.ledger.checkpoint", stream=subjects.EVENTS_STREAM
            )
            [published] = await checkpoints.fetch(1, timeout=10)  # ... and published its checkpoint over TLS
            assert json.loads(published.data)["type"] == "ledger.checkpoint"
        finally:
            await client.close()
    assert tls_nats.violations() == []
    assert "TLS required for client connections" in tls_nats.log.read_text()


async def test_a_client_without_the_ca_fails_certificate_verification_clearly(tls_nats, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(nats_tls.CA_ENV)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await nats.connect(tls_nats.url_for("client"), allow_reconnect=False, connect_timeout=5)
    elsewhere = tmp_path / "no-ca-here"
    with pytest.raises(errors.Unavailable, match="TLS certificate is not trusted .*STRATA_NATS_CA") as caught:
        await connection.connect(tls_nats.url_for("client"), elsewhere, allow_reconnect=False)
    assert ":***@" in caught.value.message and tls_nats.credentials["client"].password not in caught.value.message
    code, _, err = await cli(capsys, "health", "--nats-url", tls_nats.url_for("client"), "--data-dir", str(elsewhere))
    assert code == 1 and "TLS certificate is not trusted" in err
    # nats-py, allowed to reconnect (as `strata complete` is), would hang after the failed handshake
    code, _, err = await cli(capsys, "complete", "tiny", "hi", "--nats-url", tls_nats.url, "--data-dir", str(elsewhere))
    assert code == 1 and "TLS certificate is not trusted" in err


async def test_a_plaintext_client_is_refused(tls_nats):
    def speak_plaintext() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", tls_nats.port), timeout=10) as sock:
            info = sock.recv(4096)
            sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            return info, answer

    info, answer = await asyncio.to_thread(speak_plaintext)
    assert json.loads(info.removeprefix(b"INFO ").strip())["tls_required"] is True
    assert b"PONG" not in answer  # the server closed the connection instead of answering
    await eventually(lambda: "TLS handshake error" in tls_nats.log.read_text(), 10, "the refusal in the server log")


# -- who may connect --------------------------------------------------------------------------
async def test_no_anonymous_connections_but_the_cli_uses_the_data_dirs_credential(
    auth_nats, data_dir, tmp_path, capsys
):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(auth_nats.url, allow_reconnect=False, connect_timeout=5)
    service = make_service(LEDGER, auth_nats.url_for(LEDGER), data_dir / "services")
    async with service.running():
        code, out, err = await cli(
            capsys, "ledger", "head", "--json", "--nats-url", auth_nats.url, "--data-dir", str(data_dir)
        )
        assert code == 0, err
        assert json.loads(out)["tree_size"] == 0
        code, out, err = await cli(
            capsys, "ledger", "head", "--nats-url", auth_nats.url, "--data-dir", str(tmp_path / "empty")
        )
        assert code == 1 and "authorization violation" in err and "--data-dir" in err
    assert auth_nats.log.read_text().count("authentication error") == 2  # the two anonymous attempts


async def test_the_environment_credential_wins_over_the_data_dir(auth_nats, data_dir, monkeypatch):
    monitor = auth_nats.credentials["monitor"]
    monkeypatch.setenv("STRATA_NATS_USER", monitor.user)
    monkeypatch.setenv("STRATA_NATS_PASSWORD", "not-the-password")
    with pytest.raises(errors.Unauthorized, match="authorization violation"):
        await connection.connect(auth_nats.url, data_dir, allow_reconnect=False)
    monkeypatch.setenv("STRATA_NATS_PASSWORD", monitor.password)
    nc = await connection.connect(auth_nats.url, data_dir, allow_reconnect=False)
    await nc.close()
    assert 'User "monitor"' in auth_nats.log.read_text()


# -- strata up --nats-tls, end to end ---------------------------------------------------------
def test_strata_up_with_nats_tls_brings_services_up_over_tls(data_dir):
    up = Up(data_dir, "--no-builtin", "--nats-tls", "--services", LEDGER)
    try:
        up.wait_for("Strata is up", timeout=90)
        body = up.health(LEDGER).json()
        assert body["status"] == "ok" and body["nats_connected"]
        assert "TLS, CA" in "".join(up.lines)
        ca = nats_tls.tls_dir(data_dir) / "ca.pem"
        env_without_ca = {k: v for k, v in os.environ.items() if k != nats_tls.CA_ENV}
        head = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli.main",
                "ledger",
                "head",
                "--json",
                "--data-dir",
                str(data_dir),
                "--nats-url",
                f"nats://127.0.0.1:{up.nats_port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env_without_ca,
        )
        assert head.returncode == 0, head.stderr  # the CLI here: client.json and ca.pem from the data dir
        assert ca.is_file() and stat.S_IMODE((nats_tls.tls_dir(data_dir) / "server-key.pem").stat().st_mode) == 0o600
    finally:
        up.stop()
