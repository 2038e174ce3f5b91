"""Settings every service reads from its environment (``STRATA_*``), and the default port map."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

# Service name -> default HTTP port. The order is the order `strata up` starts them in.
DEFAULT_PORTS: dict[str, int] = {
    "api-gateway": 8000,
    "monitor": 8001,
    "model-store": 8002,
    "provenance-ledger": 8003,
    "hardware-inventory": 8004,
    "inference-worker": 8005,
}
SERVICES = tuple(DEFAULT_PORTS)
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATA_DIR = Path(".strata")
DATA_DIR_ENV = "STRATA_DATA_DIR"
T = TypeVar("T")


def nats_store_dir(data_dir: Path) -> Path:
    """Where `strata up` keeps nats-server's store (JetStream's files) in the data dir."""
    return data_dir / "nats"


def env_name(service: str, key: str) -> str:
    """``STRATA_MODEL_STORE_PORT`` style names for per-service settings."""
    return f"STRATA_{service.upper().replace('-', '_')}_{key.upper()}"


def env_value(env: Mapping[str, str], name: str, default: T, cast: Callable[[str], T]) -> T:
    """A service's own setting: ``env[name]`` read by ``cast``, ``default`` where it is unset or empty. A
    value ``cast`` refuses (ValueError) is refused again naming the variable and the value, so that a bad
    setting stops the start with one line that says which."""
    text = env.get(name)
    if not text:
        return default
    try:
        return cast(text)
    except ValueError as exc:
        raise ValueError(f"{name}={text!r}: {exc}") from None


def module_name(service: str) -> str:
    """The Python package that implements a service: ``model-store`` -> ``services.model_store``."""
    return f"services.{service.replace('-', '_')}"


class Settings(BaseModel):
    service: str
    nats_url: str = DEFAULT_NATS_URL
    data_dir: Path = DEFAULT_DATA_DIR
    node_id: str
    http_host: str = "127.0.0.1"
    http_port: int = Field(ge=0, le=65535)

    @property
    def service_dir(self) -> Path:
        """Where this service keeps its local files (indexes, keys, caches)."""
        path = self.data_dir / self.service
        path.mkdir(parents=True, exist_ok=True)
        return path

    @classmethod
    def from_env(cls, service: str, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("STRATA_DATA_DIR", DEFAULT_DATA_DIR))
        port = env.get(env_name(service, "port")) or env.get("STRATA_HTTP_PORT") or DEFAULT_PORTS.get(service, 0)
        return cls(
            service=service,
            nats_url=env.get("STRATA_NATS_URL", DEFAULT_NATS_URL),
            data_dir=data_dir,
            node_id=env.get("STRATA_NODE_ID") or node_id(data_dir),
            http_host=env.get("STRATA_HTTP_HOST", "127.0.0.1"),
            http_port=int(port),
        )


def node_id(data_dir: Path) -> str:
    """This machine's stable identity: made once, kept in the data dir, the same after a restart."""
    path = data_dir / "node-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    candidate = f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(candidate + "\n")
    try:
        os.link(tmp, path)  # atomic: when two processes race, the first link wins and both read it
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def data_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """The data dir a process on this machine uses: $STRATA_DATA_DIR, else .strata."""
    env = os.environ if environ is None else environ
    return Path(env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
