"""`strata up`: start NATS and every service as its own OS process, and keep them running.

The parts: the child processes (cli/processes.py), what is made over NATS before any service starts
(cli/bootstrap.py) and the built-in model's deploy once all are healthy (cli/builtin.py). The
Supervisor here decides what runs, with which settings, and in which order.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from builtin_model import MODEL_NAME
from cli import natsd
from cli.bootstrap import bootstrap_api_key, provision_streams
from cli.connection import redacted
from cli.processes import Child, ProcessGroup
from cli.up_options import ROLE_ENV, UpOptions, lock_data_dir
from shared import endpoints, http_tls, nats_auth, nats_tls
from shared.config import DEFAULT_PORTS, env_name, nats_store_dir, node_id

BUILTIN_NEEDS = ("model-store", "hardware-inventory", "inference-worker")


class Supervisor:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.processes = ProcessGroup(self.say)
        self.stopping = self.processes.stopping
        self.credentials: dict[str, nats_auth.Credential] = {}  # empty: NATS without auth
        self.nats_ca: Path | None = options.nats_tls_ca  # the CA every child trusts for NATS (STRATA_NATS_CA)
        self.nats_tls = False
        self.https: http_tls.ServerTls | None = None  # what every service serves HTTPS with; None: plain HTTP

    # -- output and children -----------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, flush=True)

    def _add(self, name: str, argv: list[str], env: dict[str, str], health_url: str) -> Child:
        return self.processes.add(name, argv, env, health_url)

    async def _wait_healthy(self, children: list[Child], timeout_s: float) -> list[Child]:
        return await self.processes.wait_healthy(children, timeout_s, http_tls.health_check_verify(self.https))

    # -- the whole run -----------------------------------------------------------------------
    def _check_ports(self) -> str | None:
        wanted = {name: self.options.ports.get(name, DEFAULT_PORTS[name]) for name in self.options.services}
        if self.options.nats_url is None:
            wanted = {"nats": self.options.nats_port, "nats monitoring": self.options.nats_monitor_port, **wanted}
        for name, port in wanted.items():
            if natsd.port_in_use(port, self.options.host):
                flag = {"nats": "--nats-port", "nats monitoring": "--nats-monitor-port"}.get(
                    name, f"--port {name}=PORT"
                )
                return f"port {port} for {name} is already in use; free it or choose another with {flag}"
        return None

    async def run(self) -> int:
        opts = self.options
        if problem := opts.problem() or self._check_ports():
            self.say(f"strata up: {problem}")
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        if (holder := lock_data_dir(opts.data_dir)) is not None:
            self.say(
                f"strata up: the data dir {opts.data_dir} is in use by another strata up ({holder}): stop it, "
                "or give this one its own --data-dir (two on one JetStream store would corrupt it)"
            )
            return 2
        try:
            self.https = self._http_tls()
        except http_tls.TlsSetupError as exc:
            self.say(f"strata up: {exc}")
            return 1
        if warning := self._plain_http_warning():
            self.say(warning)
        node = node_id(opts.data_dir)
        started = time.monotonic()
        try:
            nats_url = opts.nats_url or await self._start_nats()
            if nats_url is None:
                return 1
            if opts.role == "all" and (problem := await provision_streams(functools.partial(self._connect, nats_url))):
                self.say(problem)
                if opts.nats_url is None:
                    return 1  # our own NATS: the admin credential is ours, so this is a real failure
            # before any service starts, so that none of them is ever open for a moment
            try:
                key_note = await self._bootstrap_api_key(nats_url) if opts.api_keys and opts.role == "all" else None
            except Exception as exc:  # e.g. an external NATS whose credential may not write the key bucket
                self.say(
                    f"strata up: could not make the admin API key: {type(exc).__name__}: {exc} "
                    "(--no-api-key starts with the HTTP APIs open)"
                )
                return 1
            self._start_services(nats_url, node)
            services = [c for c in self.processes.children if c.name != "nats"]
            unhealthy = await self._wait_healthy(services, opts.wait_timeout_s)
            if self.stopping.is_set():
                return 0
            if unhealthy:
                self.say(
                    f"strata up: not healthy after {opts.wait_timeout_s:.0f}s: {', '.join(c.name for c in unhealthy)}"
                )
                return 1
            self._print_endpoints(nats_url, node, time.monotonic() - started)
            endpoints.write(opts.data_dir, self._endpoints(nats_url))  # the strata commands here find them
            if key_note:
                self.say(key_note)
            if opts.serve_builtin and set(BUILTIN_NEEDS) <= set(opts.services):
                await self._serve_builtin(nats_url)
            await self.stopping.wait()
            return 0
        finally:
            self.say("strata up: stopping")
            endpoints.remove(opts.data_dir)
            await self.processes.stop_all()
            self.say("strata up: stopped")

    async def _bootstrap_api_key(self, nats_url: str) -> str:
        return await bootstrap_api_key(functools.partial(self._connect, nats_url), self.options.data_dir)

    async def _connect(self, nats_url: str, role: str, **options: Any):  # type: ignore[no-untyped-def]
        """The supervisor's own NATS connection, as ``role`` where NATS has users, over TLS where it has that."""
        import nats

        credential = self.credentials.get(role)
        return await nats.connect(
            credential.url(nats_url) if credential else nats_url,
            inbox_prefix=nats_auth.inbox_prefix(role),
            tls=nats_tls.client_context(self.nats_ca),
            **options,
        )

    async def _serve_builtin(self, nats_url: str) -> None:
        from cli.builtin import serve_builtin_while_up

        nc = await self._connect(nats_url, nats_auth.CLIENT, max_reconnect_attempts=-1)
        try:
            await serve_builtin_while_up(nc, self.stopping, self.say, self._try_builtin)
        finally:
            await nc.close()

    def _try_builtin(self) -> str:
        from shared.apikeys import key_file

        key = key_file(self.options.data_dir)
        auth = f"-H \"Authorization: Bearer $(cat {key})\" " if key.exists() else ""
        cacert = f"--cacert {self.https.ca} " if self.https and self.https.ca else ""
        return (
            f"curl {cacert}{auth}{self._scheme()}://{self.options.host}:"
            f"{self.options.ports.get('api-gateway', DEFAULT_PORTS['api-gateway'])}/v1/models  "
            f"or  strata chat {MODEL_NAME}"
        )

    async def _start_nats(self) -> str | None:
        opts = self.options
        store = nats_store_dir(opts.data_dir)
        store.mkdir(parents=True, exist_ok=True)
        log_file = store / "nats-server.log"
        try:
            argv = natsd.argv(opts.nats_port, store, monitor_port=opts.nats_monitor_port, host=opts.host)
            argv += ["--log", str(log_file)]  # its start-up banner would drown the services' lines
            tls = self._server_tls()
            if opts.secure_nats:
                self.credentials = nats_auth.credentials(opts.data_dir)
            if config := natsd.config(opts.data_dir, secure=opts.secure_nats, tls=tls):
                argv += ["-c", str(config)]
        except (natsd.NatsServerNotFound, nats_tls.TlsSetupError) as exc:
            self.say(f"strata up: {exc}")
            return None
        health = f"http://{opts.host}:{opts.nats_monitor_port}/healthz?js-enabled-only=true"
        nats = self._add("nats", argv, dict(os.environ), health)
        if await self._wait_healthy([nats], 15.0):
            self.say(f"strata up: nats-server did not become healthy in 15s; see {log_file}")
            return None
        return f"nats://{opts.host}:{opts.nats_port}"

    def _server_tls(self) -> nats_tls.ServerTls | None:
        opts = self.options
        if opts.nats_tls_cert and opts.nats_tls_key:
            tls = nats_tls.given(opts.nats_tls_cert, opts.nats_tls_key, opts.nats_tls_ca)
        elif opts.nats_tls:
            tls = nats_tls.ensure_generated(opts.data_dir, opts.host)
        else:
            return None
        self.nats_tls, self.nats_ca = True, tls.ca
        return tls

    def _start_services(self, nats_url: str, node: str) -> None:
        opts = self.options
        for name in opts.services:
            port = opts.ports.get(name, DEFAULT_PORTS[name])
            env = {
                **os.environ,
                "STRATA_NATS_URL": nats_url,
                "STRATA_DATA_DIR": str(opts.data_dir.resolve()),
                "STRATA_NODE_ID": node,
                "STRATA_HTTP_HOST": opts.host,
                env_name(name, "port"): str(port),
                "PYTHONUNBUFFERED": "1",
                **ROLE_ENV.get(opts.role, {}).get(name, {}),
            }
            if name in self.credentials:
                env.update(self.credentials[name].env())
            if self.nats_ca is not None:
                env[nats_tls.CA_ENV] = str(self.nats_ca.resolve())
            if name == "hardware-inventory" and opts.admission_policy is not None:
                env["STRATA_ADMISSION_POLICY"] = str(opts.admission_policy.resolve())  # the child may run elsewhere
            if self.https is not None:
                env.update(http_tls.server_env(self.https))
            argv = [sys.executable, "-m", "cli.main", "serve", name]
            self._add(name, argv, env, f"{self._scheme()}://{opts.host}:{port}/healthz")

    def _http_tls(self) -> http_tls.ServerTls | None:
        opts = self.options
        if opts.https_cert and opts.https_key:
            return http_tls.given(opts.https_cert, opts.https_key, opts.https_ca)
        if opts.https:
            return http_tls.ensure_generated(opts.data_dir, opts.host)
        return None

    def _plain_http_warning(self) -> str | None:
        opts = self.options
        if self.https is None and opts.api_keys and not http_tls.is_loopback(opts.host):
            return (
                f"strata up: warning: HTTP on {opts.host} is plain: "
                "API keys cross the network in clear text (use --https)"
            )
        return None

    def _scheme(self) -> str:
        return "http" if self.https is None else "https"

    def _https_note(self) -> str:
        assert self.https is not None
        if self.https.ca is None:
            return f"certificate {self.https.cert}, checked against the system's roots"
        here = (
            "the strata commands here trust it; "
            if self.https.ca == http_tls.tls_dir(self.options.data_dir) / "ca.pem"
            else ""
        )
        return f"CA {self.https.ca} ({here}other clients: --https-ca, {http_tls.CA_ENV} or curl --cacert)"

    def _print_endpoints(self, nats_url: str, node: str, seconds: float) -> None:
        role = "" if self.options.role == "all" else f" as a {self.options.role}"
        lines = [
            f"Strata is up{role} in {seconds:.1f}s on node {node} (data dir {self.options.data_dir})",
            f"  {'nats':<20}{redacted(nats_url)}{self._nats_security()}",
        ]
        for child in self.processes.children:
            if child.name != "nats":
                base = child.health_url.removesuffix("/healthz")
                lines.append(f"  {child.name:<20}{base}  (API docs {base}/docs)")
        if self.https is not None:
            lines.append(f"  {'https':<20}{self._https_note()}")
        lines.append("Press Ctrl-C to stop.")
        self.say("\n".join(lines))

    def _endpoints(self, nats_url: str) -> endpoints.Endpoints:
        urls = {
            c.name: endpoints.local(c.health_url.removesuffix("/healthz"))
            for c in self.processes.children
            if c.name != "nats"
        }
        ca = self.https.ca if self.https is not None else None
        return endpoints.Endpoints(
            urls=urls, ca=str(ca.resolve()) if ca else None, nats=nats_auth.without_credentials(nats_url)
        )

    def _nats_security(self) -> str:
        notes = []
        if self.credentials:
            folder = nats_auth.auth_dir(self.options.data_dir)
            notes.append(
                f"a user per service; the CLI here uses {folder / 'client.json'}, "
                f"your own programs {folder / 'app.json'} (README, 'Over NATS')"
            )
        if self.nats_tls:
            notes.append(f"TLS, CA {self.nats_ca}" if self.nats_ca else "TLS")
        return f"  ({'; '.join(notes)})" if notes else ""


def up(options: UpOptions) -> int:
    return asyncio.run(Supervisor(options).run())
