"""Where ``strata up`` serves each HTTP API, kept in ``<data-dir>/endpoints.json`` while it runs, so
that the ``strata`` commands on the same machine find them without flags: the scheme (``--https``),
the ports (``--port NAME=PORT``) and the CA that signs the certificates (generated or ``--https-ca``).

A command's URL is its flag, else its environment variable, else this file, else the default port
over plain HTTP. The file holds no secret (the API key has its own file, mode 0600).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError

from shared.config import data_dir_from_env

log = logging.getLogger(__name__)
FILE = "endpoints.json"
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}  # urlsplit gives "::" for "[::]"


class Endpoints(BaseModel):
    urls: dict[str, str]  # service name -> base URL, as a client on this machine reaches it
    ca: str | None = None  # the CA their certificates chain to; None: plain HTTP, or the system's roots
    nats: str | None = None  # the NATS URL(s) the stack uses, without credentials


def local(url: str) -> str:
    """``url`` as a client on this machine reaches it: a bind-everything host becomes loopback."""
    parts = urlsplit(url)
    if (loopback := _ANY_ADDRESS.get(parts.hostname or "")) is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{loopback}:{parts.port}" if parts.port else loopback))


def write(directory: Path, endpoints: Endpoints) -> None:
    path = directory / FILE
    partial = path.with_suffix(".tmp")
    partial.write_text(endpoints.model_dump_json(indent=2))
    partial.replace(path)  # readers never see half a file


def remove(directory: Path) -> None:
    (directory / FILE).unlink(missing_ok=True)


def read(directory: Path | None = None) -> Endpoints | None:
    """What ``strata up`` wrote, or None: not running here, or a file it cannot have written (logged)."""
    path = (directory or data_dir_from_env()) / FILE
    try:
        return Endpoints.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def url(service: str, env_var: str, default: str, directory: Path | None = None) -> str:
    """``$env_var``, else where ``strata up`` serves ``service``, else ``default`` (said on stderr)."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    served = read(directory)
    if served is not None and service in served.urls:
        return served.urls[service]
    return fallback(service, default, directory)


def nats(default: str, directory: Path | None = None) -> str:
    """The NATS of the ``strata up`` on this data dir, else ``default`` (said on stderr)."""
    served = read(directory)
    return served.nats if served is not None and served.nats else fallback("NATS", default, directory)


_said: set[str] = set()


def fallback(what: str, default: str, directory: Path | None) -> str:
    """``default``, with one line on stderr, so that a command never silently talks to another stack."""
    if what not in _said:
        _said.add(what)
        where = (directory or data_dir_from_env()) / FILE
        print(f"strata: no running strata up recorded in {where}; using {what} at {default} "
              f"(--data-dir, or the flag/environment variable, to choose)", file=sys.stderr)
    return default
