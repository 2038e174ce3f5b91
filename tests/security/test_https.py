"""HTTPS for the HTTP APIs as `strata up --https` sets it up (shared/http_tls.py on shared/tls.py): a service
started the way `strata up` starts it (`strata serve NAME`, i.e. shared/service.py ``run`` under real
uvicorn) serves HTTPS when STRATA_HTTP_TLS_CERT/KEY are set; real clients (httpx, the ``openai`` package, the
`strata` CLI) trust the generated CA and refuse anything else."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509

from cli import main as cli_main
from cli import natsd
from cli.up import Supervisor
from cli.up_options import UpOptions
from shared import endpoints, http_tls, nats_tls
from shared.service import Service, run
from tests.support.fake_worker import FakeWorker, Script
from tests.support.helpers import settings_for
from tests.support.up import Up

pytestmark = pytest.mark.timeout(180)
KEY = "sk-strata-https-test"
HTTP_ENV = (http_tls.CERT_ENV, http_tls.KEY_ENV, http_tls.CA_ENV)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def https(data_dir: Path) -> http_tls.ServerTls:
    return http_tls.ensure_generated(data_dir)


@pytest.fixture(autouse=True)
def no_inherited_trust(monkeypatch, tmp_path: Path) -> None:
    """Neither the developer's environment nor the working directory's .strata decides what a test trusts."""
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STRATA_DATA_DIR", str(tmp_path / "no-data-dir"))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HTTP_ENV}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Served:
    """`strata serve NAME` as `strata up` runs it, in a subprocess."""

    process: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        return out


@pytest.fixture
def gateway(nats_server, data_dir: Path, https: http_tls.ServerTls) -> Iterator[Served]:
    port = natsd.free_port()
    env = child_env(STRATA_NATS_URL=nats_server.url, STRATA_DATA_DIR=str(data_dir), STRATA_HTTP_HOST="127.0.0.1",
                    STRATA_API_GATEWAY_PORT=str(port), STRATA_API_KEYS=KEY, **http_tls.server_env(https))
    served = Served(subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "api-gateway"], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT), port)
    try:
        verify = http_tls.client_verify(https.ca)
        deadline = time.monotonic() + 60
        while True:
            assert served.process.poll() is None, f"the gateway exited:\n{served.stop()}"
            try:
                if httpx.get(f"{served.url}/healthz", verify=verify, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the gateway was not healthy over HTTPS in 60 s:\n{served.stop()}"
            time.sleep(0.2)
        yield served
    finally:
        served.stop()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- real clients against a real HTTPS server -------------------------------------------------
async def test_the_gateway_serves_the_openai_client_over_https_with_the_generated_ca(gateway, https, nats_server):
    worker = await FakeWorker(nats_server.url, {"tiny": Script()}).start()
    try:
        async with httpx.AsyncClient(verify=http_tls.client_verify(https.ca), timeout=30) as http:
            health = await http.get(f"{gateway.url}/healthz")
            assert health.status_code == 200 and health.url.scheme == "https"
            client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, http_client=http, max_retries=0)
            assert "tiny" in [m.id for m in (await client.models.list()).data]
            chat = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.content == "Hello, world!"
            stranger = openai.AsyncOpenAI(
                base_url=f"{gateway.url}/v1", api_key="sk-wrong", http_client=http, max_retries=0
            )
            with pytest.raises(openai.AuthenticationError):
                await stranger.models.list()
    finally:
        await worker.stop()


async def test_a_client_without_the_ca_or_speaking_plain_http_is_refused(gateway, tmp_path):
    async with httpx.AsyncClient(timeout=10) as system_roots:
        with pytest.raises(httpx.ConnectError) as caught:
            await system_roots.get(f"{gateway.url}/healthz")
        assert http_tls.failure(caught.value, gateway.url) == http_tls.UNTRUSTED
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, http_client=system_roots, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()
        plain = f"http://127.0.0.1:{gateway.port}"
        with pytest.raises(httpx.TransportError) as caught:
            await system_roots.get(f"{plain}/healthz")
        assert "use https://" in (http_tls.failure(caught.value, plain) or "")
    other_ca = http_tls.ensure_generated(tmp_path / "stranger").ca
    async with httpx.AsyncClient(verify=http_tls.client_verify(other_ca), timeout=10) as wrong_ca:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await wrong_ca.get(f"{gateway.url}/healthz")


async def test_an_idle_keep_alive_client_does_not_hold_up_a_stop(gateway, https):
    async with httpx.AsyncClient(verify=http_tls.client_verify(https.ca), timeout=10) as idle:
        assert (await idle.get(f"{gateway.url}/healthz")).status_code == 200
        output = await asyncio.to_thread(gateway.stop)  # TimeoutExpired (30 s) if the TLS connection held it up
        # uvicorn re-raises the SIGTERM it handled once it has shut down: how every service exits under `strata up`
        assert gateway.process.returncode == -signal.SIGTERM and "Traceback" not in output


def test_the_cli_says_in_one_line_when_it_does_not_trust_the_certificate(gateway, https, data_dir, capsys, monkeypatch):
    code, _, err = cli(capsys, "model", "ls", "--url", gateway.url)
    assert code == 1 and http_tls.UNTRUSTED in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "top", "--once", "--url", gateway.url)
    assert code == 1 and err.strip() == f"strata top: the monitor at {gateway.url}: {http_tls.UNTRUSTED}"
    code, _, err = cli(
        capsys, "model", "ls", "--url", gateway.url, "--https-ca", str(tmp := data_dir / "missing-ca.pem")
    )
    assert code == 1 and str(tmp) in err and http_tls.CA_ENV in err
    # Trusted (--https-ca, $STRATA_HTTP_CA, the data dir's ca.pem): the TLS handshake passes and the gateway
    # answers (401: this CLI sends no key), so the error is about the request, not the certificate.
    for args, env in (
        (["--https-ca", str(https.ca)], {}),
        ([], {http_tls.CA_ENV: str(https.ca)}),
        ([], {"STRATA_DATA_DIR": str(data_dir)}),
    ):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        code, _, err = cli(capsys, "model", "ls", "--url", gateway.url, *args)
        assert code == 1 and "missing API key" in err and "certificate" not in err, (args, env, err)
        monkeypatch.delenv(http_tls.CA_ENV, raising=False)


# -- the certificates, and run() refusing bad ones --------------------------------------------
def test_generated_certificates_are_private_named_for_this_host_and_reused(data_dir):
    first = http_tls.ensure_generated(data_dir)
    folder = http_tls.tls_dir(data_dir)
    assert folder == data_dir / "http" / "tls" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    for key in (first.key, folder / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate(first.ca.read_bytes())
    server = x509.load_pem_x509_certificate(first.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert "HTTP CA" in ca.subject.rfc4514_string()
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "::1"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}

    before = {p: p.read_bytes() for p in folder.glob("*.pem")}
    assert http_tls.ensure_generated(data_dir) == first  # a second `strata up --https`
    assert {p: p.read_bytes() for p in folder.glob("*.pem")} == before
    assert not nats_tls.tls_dir(data_dir).exists(), "HTTPS and NATS keep separate CAs"
    everywhere = http_tls.ensure_generated(data_dir, host="0.0.0.0")  # "every address" is no name to put in a SAN
    assert everywhere.cert.read_bytes() == before[first.cert]


def test_given_certificates_are_used_as_is_and_checked(tmp_path, data_dir):
    own = http_tls.ensure_generated(tmp_path / "issuer")
    other = http_tls.ensure_generated(tmp_path / "another")
    supervisor = Supervisor(UpOptions(data_dir=data_dir, https_cert=own.cert, https_key=own.key, https_ca=own.ca))
    given = supervisor._http_tls()
    assert given == http_tls.ServerTls(cert=own.cert, key=own.key, ca=own.ca)
    assert http_tls.server_env(given) == {
        http_tls.CERT_ENV: str(own.cert),
        http_tls.KEY_ENV: str(own.key),
        http_tls.CA_ENV: str(own.ca),
    }
    assert not http_tls.tls_dir(data_dir).exists(), "nothing generated when certificates are given"
    with pytest.raises(http_tls.TlsSetupError, match="does not belong to the certificate"):
        http_tls.given(own.cert, other.key)
    assert UpOptions(data_dir=data_dir, https_cert=own.cert).problem() == "--https-cert and --https-key go together"
    assert "--https-ca" in UpOptions(data_dir=data_dir, https=True, https_ca=own.ca).problem()
    with pytest.raises(http_tls.TlsSetupError, match="go together"):
        http_tls.served({http_tls.CERT_ENV: str(own.cert)})
    assert http_tls.served({}) is None


def test_a_bad_certificate_stops_run_with_a_clear_message(tmp_path, monkeypatch, https):
    service = Service("provenance-ledger", settings_for("provenance-ledger", "nats://127.0.0.1:1", tmp_path))
    missing = tmp_path / "missing.pem"
    for cert, key, expected in (
        (missing, https.key, str(missing)),
        (https.cert, http_tls.ensure_generated(tmp_path / "x").key, "does not belong"),
    ):
        monkeypatch.setenv(http_tls.CERT_ENV, str(cert))
        monkeypatch.setenv(http_tls.KEY_ENV, str(key))
        with pytest.raises(SystemExit) as stopped:
            run(service)
        assert isinstance(stopped.value.code, str) and expected in stopped.value.code
        assert stopped.value.code.startswith("provenance-ledger: cannot serve HTTPS")

    as_up_runs_it = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "provenance-ledger"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(**{http_tls.CERT_ENV: str(missing), http_tls.KEY_ENV: str(https.key)}),
    )
    assert as_up_runs_it.returncode == 1 and "Traceback" not in as_up_runs_it.stderr
    assert str(missing) in as_up_runs_it.stderr.strip().splitlines()[-1]


def test_plain_http_with_api_keys_on_a_network_address_is_warned_about(data_dir, https):
    def warning(**options: object) -> str | None:
        supervisor = Supervisor(UpOptions(data_dir=data_dir, **options))  # type: ignore[arg-type]
        supervisor.https = supervisor._http_tls()
        return supervisor._plain_http_warning()

    assert "API keys cross the network in clear text" in (warning(host="0.0.0.0") or "")
    assert warning(host="127.0.0.1") is None and warning(host="localhost") is None and warning(host="::1") is None
    assert warning(host="0.0.0.0", api_keys=False) is None and warning(host="0.0.0.0", https=True) is None


# -- strata up --https, end to end ------------------------------------------------------------
def test_strata_up_with_https_serves_every_api_over_https_and_the_cli_trusts_it(data_dir, capsys, monkeypatch):
    up = Up(data_dir, "--no-builtin", "--https", "--services", "model-store")
    try:
        up.wait_for("Strata is up", timeout=90)
        url = f"https://127.0.0.1:{up.ports['model-store']}"
        output = "".join(up.lines)
        assert f"{url}  (API docs {url}/docs)" in output and "warning" not in output
        assert f"CA {http_tls.tls_dir(data_dir) / 'ca.pem'}" in output
        tls = http_tls.tls_dir(data_dir)
        assert stat.S_IMODE(tls.stat().st_mode) == 0o700
        assert stat.S_IMODE((tls / "server-key.pem").stat().st_mode) == 0o600
        assert httpx.get(f"{url}/healthz", verify=http_tls.client_verify(tls / "ca.pem"), timeout=10).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://127.0.0.1:{up.ports['model-store']}/healthz", timeout=10)
        monkeypatch.setenv("STRATA_DATA_DIR", str(data_dir))  # the CLI on this machine: ca.pem and api-key from there
        monkeypatch.delenv("STRATA_MODEL_STORE_URL", raising=False)
        code, out, err = cli(capsys, "model", "ls", "--json", "--url", url)
        assert code == 0 and '"models"' in out, err
        # no --url at all: the CLI finds the https URL, its port and the CA in what strata up wrote
        served = endpoints.read(data_dir)
        assert (
            served is not None and served.urls == {"model-store": url} and served.ca == str((tls / "ca.pem").resolve())
        )
        code, out, err = cli(capsys, "model", "ls", "--json")
        assert code == 0 and '"models"' in out, err
    finally:
        up.stop()
    assert endpoints.read(data_dir) is None  # gone with strata up: the defaults apply again
