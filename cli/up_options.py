"""What `strata up` is given (its options and roles) and what it takes before it starts anything (its
data dir, locked for this process)."""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import SERVICES

# What each role runs. "node": a machine that only lends its hardware to an existing cluster: the
# inventory agent (probe + heartbeats, no registry) and an inference-worker.
ROLES: dict[str, tuple[str, ...]] = {"all": SERVICES, "node": ("hardware-inventory", "inference-worker")}
ROLE_ENV: dict[str, dict[str, dict[str, str]]] = {"node": {"hardware-inventory": {"STRATA_INVENTORY_ROLES": "agent"}}}


@dataclass
class UpOptions:
    data_dir: Path
    nats_url: str | None = None
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    wait_timeout_s: float = 30.0
    role: str = "all"
    serve_builtin: bool = True
    secure_nats: bool = True  # per-service NATS users and permissions (shared/nats_auth.py)
    nats_tls: bool = False  # TLS with a CA and server certificate generated into the data dir
    nats_tls_cert: Path | None = None  # ... or with these (shared/nats_tls.py)
    nats_tls_key: Path | None = None
    nats_tls_ca: Path | None = None  # what the services trust; with --nats-url, the external NATS's CA
    admission_policy: Path | None = None  # hardware-inventory's admission policy file (infra/policy.example.yaml)
    api_keys: bool = True  # make an admin API key at first start, so the HTTP APIs are never open by default
    https: bool = False  # HTTPS with a CA and server certificate generated into the data dir
    https_cert: Path | None = None  # ... or with these (shared/http_tls.py)
    https_key: Path | None = None
    https_ca: Path | None = None  # the CA that signed --https-cert, for the clients here

    def problem(self) -> str | None:
        """What is wrong with the TLS options, in the flags' words; None when they fit together."""
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            return "--nats-tls-cert and --nats-tls-key go together"
        if self.nats_url and (self.nats_tls or self.nats_tls_cert):
            return ("--nats-tls and --nats-tls-cert configure the nats-server strata up starts; with --nats-url "
                    "give the CA your NATS uses with --nats-tls-ca")
        if (self.https_cert is None) != (self.https_key is None):
            return "--https-cert and --https-key go together"
        if self.https_ca is not None and self.https_cert is None:
            return "--https-ca names the CA of --https-cert (with --https the CA is generated)"
        if self.admission_policy is not None and not self.admission_policy.is_file():
            return f"--policy {self.admission_policy}: no such file"
        return None


LOCK_FILE = "strata-up.lock"
_data_dir_locks: dict[Path, int] = {}  # held open while this process runs: the lock goes with it, even on kill -9


def lock_data_dir(data_dir: Path) -> str | None:
    """Take the data dir for this process; None when taken, else who holds it (the lock is the kernel's,
    so a stack that died never leaves a stale one)."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _data_dir_locks[data_dir.resolve()] = fd
    return None
