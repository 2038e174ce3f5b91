"""docker-compose.yml under podman-compose, for the container tests: the images it runs (the stand-ins for
registry-only ones selected through the compose file's image variables), bringing it up, each
container's own health check, and taking it all down again."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "strata"
IMAGES = {  # compose variable -> the image infra/podman/build.sh builds
    "STRATA_IMAGE": "strata:slim",
    "STRATA_WORKER_IMAGE": "strata:worker-cpu",
    "NATS_IMAGE": "strata-nats:local",
    "PROMETHEUS_IMAGE": "strata-prometheus:local",
}
PUBLISHED = [4222, 8222, 8000, 8001, 8002, 8003, 8004, 9090]
HOW_TO_RUN = ("STRATA_CONTAINER_TESTS=1 after `infra/podman/setup.sh && infra/podman/build.sh` "
              "(.ci/run does all three on a machine where podman can be set up)")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def problem() -> str | None:
    """Why the stack cannot run here, or None."""
    for tool in ("podman", "podman-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run infra/podman/setup.sh"
    missing = [image for image in IMAGES.values() if podman("image", "exists", image, check=False).returncode != 0]
    if missing:
        return f"images not built: {', '.join(missing)}: run infra/podman/build.sh"
    busy = [port for port in PUBLISHED if _listening(port)]
    if busy:
        return f"ports the compose file publishes are in use on this machine: {busy}"
    return None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def services() -> list[str]:
    """Every service of docker-compose.yml that runs here: all but the GPU profile's and Grafana (no
    stand-in image for it)."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return [name for name, spec in compose["services"].items() if not spec.get("profiles") and name != "grafana"]


def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **IMAGES}
    return subprocess.run(["podman-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def containers() -> dict[str, str]:
    """compose service -> container name, for this project's containers (running or not)."""
    listing = json.loads(podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                                "--format", "json").stdout or "[]")
    return {c["Labels"]["com.docker.compose.service"]: c["Names"][0] for c in listing}


def wait_healthy(names: dict[str, str], timeout: float) -> None:
    """Run each container's own compose health check (`podman healthcheck run`: podman has no systemd
    timer here to run them on its own) until all pass."""
    pending, deadline = dict(names), time.monotonic() + timeout
    while pending:
        for service, name in list(pending.items()):
            if podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
                del pending[service]
        if not pending:
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}:\n{logs_of(name)}" for name in pending.values())
            raise AssertionError(f"not healthy after {timeout:.0f}s: {sorted(pending)}\n{logs}")
        time.sleep(3)


def logs_of(name: str, lines: int = 30) -> str:
    result = podman("logs", "--tail", str(lines), name, check=False)
    return (result.stdout + result.stderr).strip()


def down() -> list[str]:
    """Stop and remove everything the project made (containers, its network, its volumes: podman-compose
    1.0.3's `down -v` leaves the network); returns what is still there afterwards (empty when all went)."""
    compose("down", "-v", timeout=300)
    for name in containers().values():  # anything podman-compose left behind
        podman("rm", "-f", "-v", name, check=False, timeout=120)
    volumes = podman(
        "volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}", check=False
    ).stdout.split()
    for volume in volumes:
        podman("volume", "rm", "-f", volume, check=False)
    podman("network", "rm", "-f", f"{PROJECT}_default", check=False)
    left = list(containers().values())
    if podman("network", "exists", f"{PROJECT}_default", check=False).returncode == 0:
        left.append(f"network {PROJECT}_default")
    left += podman(
        "volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}", check=False
    ).stdout.split()
    return left
