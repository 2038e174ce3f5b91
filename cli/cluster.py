"""A NATS cluster on one machine: config rendering and launching, for tests and local experiments.

``render_server`` writes the shape of infra/nats/cluster.conf with loopback ports in place of the
container hostnames. ``LocalCluster`` starts N real nats-servers with JetStream, waits until they have
elected a JetStream meta leader and every member is current, and can stop, kill and restart one member
with its port and store kept (what a fault-injection suite needs).

    python -m cli.cluster --size 3 --dir .strata/cluster     # prints the client URLs, Ctrl-C stops
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cli import natsd

CLUSTER_NAME = "strata"


@dataclass(frozen=True)
class ServerSpec:
    """One member: its name, its three ports and its JetStream store."""

    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def config_file(self) -> Path:
        return self.store_dir / "nats.conf"

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"


def _quoted(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid NATS config string


def render_server(spec: ServerSpec, routes: list[str], *, cluster_name: str = CLUSTER_NAME,
                  include: Path | None = None) -> str:
    """The config of one cluster member (routes to every member; a server skips its own)."""
    lines = [
        f"server_name: {_quoted(spec.name)}",
        f"host: {_quoted(spec.host)}",
        f"port: {spec.client_port}",
        f"http: {_quoted(f'{spec.host}:{spec.monitor_port}')}",
        "max_payload: 1MB",
        f"jetstream {{ store_dir: {_quoted(spec.store_dir / 'jetstream')} }}",
        "cluster {",
        f"  name: {_quoted(cluster_name)}",
        f"  listen: {_quoted(f'{spec.host}:{spec.cluster_port}')}",
        "  routes: [",
        *(f"    {route}" for route in routes),
        "  ]",
        "}",
    ]
    if include is not None:
        lines.append(f"include {_quoted(include)}")
    return "\n".join(lines) + "\n"


def plan(base_dir: Path, size: int = 3, host: str = "127.0.0.1", prefix: str = "n") -> list[ServerSpec]:
    """Specs for ``size`` members on free ports, each with its own store under ``base_dir``."""
    if size < 1:
        raise ValueError("a cluster has at least one member")
    return [
        ServerSpec(name=f"{prefix}{i}", client_port=natsd.free_port(host), cluster_port=natsd.free_port(host),
                   monitor_port=natsd.free_port(host), store_dir=base_dir / f"{prefix}{i}", host=host)
        for i in range(1, size + 1)
    ]


class ClusterNotReady(RuntimeError):
    pass


class LocalCluster:
    """N nats-server processes on one host, clustered with JetStream. Use as a context manager."""

    def __init__(
        self, base_dir: Path, size: int = 3, host: str = "127.0.0.1", cluster_name: str = CLUSTER_NAME
    ) -> None:
        self.specs = {spec.name: spec for spec in plan(base_dir, size, host)}
        self.cluster_name = cluster_name
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        routes = [spec.route_url for spec in self.specs.values()]
        for spec in self.specs.values():
            spec.store_dir.mkdir(parents=True, exist_ok=True)
            spec.config_file.write_text(render_server(spec, routes, cluster_name=cluster_name))

    # -- addresses ---------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [spec.url for spec in self.specs.values()]

    @property
    def url(self) -> str:
        """The first member's URL: a client connected there learns the others from the server."""
        return self.urls[0]

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> LocalCluster:
        for name in self.specs:
            self.start_server(name)
        self.wait_ready(timeout)
        return self

    def start_server(self, name: str) -> None:
        """Start (or restart) one member with its config, port and store unchanged."""
        spec = self.specs[name]
        if (proc := self.processes.get(name)) is not None and proc.poll() is None:
            return
        log = spec.log_file.open("ab")
        self.processes[name] = subprocess.Popen(
            [str(natsd.binary()), "-c", str(spec.config_file)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()

    def stop_server(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill_server(self, name: str) -> None:
        self.stop_server(name, signal.SIGKILL)

    def close(self) -> None:
        for name in list(self.processes):
            self.stop_server(name)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- readiness ---------------------------------------------------------------------------
    def _get(self, spec: ServerSpec, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(spec.monitor_url + path, timeout=2) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def problems(self) -> list[str]:
        """What keeps the running members from serving JetStream at full replication (empty: ready)."""
        found = []
        running = [self.specs[n] for n, p in self.processes.items() if p.poll() is None]
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                found.append(f"{name} exited with {proc.returncode} (see {self.specs[name].log_file})")
        for spec in running:
            status, _ = self._get(spec, "/healthz")
            if status != 200:
                found.append(f"{spec.name} /healthz answered {status or 'nothing'}")
                continue
            _, jsz = self._get(spec, "/jsz")
            meta = jsz.get("meta_cluster") or {}
            if not meta.get("leader"):
                found.append(f"{spec.name} knows no JetStream meta leader yet")
            elif spec.name == meta["leader"]:
                peers = {r.get("name"): r for r in meta.get("replicas") or []}
                behind = [n for n in self.processes if n != spec.name and not (peers.get(n) or {}).get("current")]
                if behind:
                    found.append(f"meta leader {spec.name} sees {', '.join(sorted(behind))} not current")
        return found

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while problems := self.problems():
            if time.monotonic() > deadline or any("exited" in p for p in problems):
                raise ClusterNotReady(f"NATS cluster not ready after {timeout:.0f}s: {'; '.join(problems)}")
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.cluster", description="run a local NATS cluster until Ctrl-C")
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(".strata/cluster"))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir, args.size, args.host)
    try:
        cluster.start()
        print("NATS cluster ready:", ",".join(cluster.urls), flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
