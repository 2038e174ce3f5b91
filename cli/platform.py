"""Commands that run or inspect the platform as a whole: up, serve, health, subjects, train."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from cli import connection
from shared.config import DEFAULT_PORTS, SERVICES


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start NATS and every service, supervised, until Ctrl-C")
    up.add_argument("--data-dir", type=Path, default=connection.default_data_dir(),
                    help="where NATS, the services, the credentials and certificates keep their files "
                         "(default $STRATA_DATA_DIR or .strata)")
    up.add_argument("--nats-url", help="use this NATS instead of starting nats-server")
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--nats-monitor-port", type=int, default=8222)
    up.add_argument("--host", default="127.0.0.1", help="address the HTTP APIs listen on")
    up.add_argument("--port", type=_port_pair, action="append", default=[], metavar="SERVICE=PORT")
    up.add_argument("--role", choices=("all", "node"), default="all",
                    help="all: NATS and every service; node: only the inventory agent and an inference-worker, "
                         "joining the cluster at --nats-url (nats://user:password@host:4222 passes credentials)")
    up.add_argument(
        "--services", type=_service_list, default=None, help="comma-separated subset to run (default: the role's)"
    )
    up.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for every service to be healthy")
    up.add_argument(
        "--no-builtin",
        dest="serve_builtin",
        action="store_false",
        help="do not deploy the built-in model once the services are healthy",
    )
    up.add_argument(
        "--insecure-nats",
        dest="secure_nats",
        action="store_false",
        help="start nats-server without per-service users and permissions (not for shared machines)",
    )
    up.add_argument(
        "--nats-tls",
        action="store_true",
        help="require TLS of every NATS connection, with a CA and server certificate generated once "
        "into DATA_DIR/nats/tls/ (the services and the CLI on this machine trust that CA)",
    )
    up.add_argument(
        "--nats-tls-cert", type=Path, metavar="FILE", help="serve NATS TLS with this certificate (PEM) instead"
    )
    up.add_argument("--nats-tls-key", type=Path, metavar="FILE", help="the private key (PEM) of --nats-tls-cert")
    up.add_argument(
        "--nats-tls-ca",
        type=Path,
        metavar="FILE",
        help="the CA (PEM) the services trust for NATS (default with --nats-tls-cert: the system's roots)",
    )
    up.add_argument(
        "--https",
        action="store_true",
        help="serve every HTTP API over HTTPS, with a CA and server certificate generated once into "
        "DATA_DIR/http/tls/ (the strata commands here trust that CA). Plain HTTP is the default, "
        "for local development on 127.0.0.1; use HTTPS when API keys cross a network",
    )
    up.add_argument("--https-cert", type=Path, metavar="FILE", help="serve HTTPS with this certificate (PEM) instead")
    up.add_argument("--https-key", type=Path, metavar="FILE", help="the private key (PEM) of --https-cert")
    up.add_argument(
        "--https-ca",
        type=Path,
        metavar="FILE",
        help="the CA (PEM) that signed --https-cert, for clients here (default: the system's roots)",
    )
    up.add_argument(
        "--no-api-key",
        dest="api_keys",
        action="store_false",
        help="do not make an admin API key at first start: every HTTP API stays open until "
        "`strata key create` makes one (throwaway machines only)",
    )
    up.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        dest="admission_policy",
        help="admission policy for deploys (see infra/policy.example.yaml); trusted_keys take model-store's "
        "public key (GET /v1/public-key), never its private signing key",
    )
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run one service in the foreground (strata up runs each this way)")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(func=_serve)

    health = connection.add_options(sub.add_parser("health", help="ask every service for its health over NATS"))
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(func=lambda args: asyncio.run(_health(args.nats_url, args.timeout, args.data_dir)))

    subjects = sub.add_parser("subjects", help="print the subject ownership table (infra/SUBJECTS.md)")
    subjects.set_defaults(func=lambda args: print(subject_table(), end=""))

    # Listed here for `strata --help` only: cli.main hands `strata train ...` to the trainer's own
    # parser before this one runs, because argparse cannot pass options through a subcommand.
    sub.add_parser("train", help="train the small built-in model (strata train --help)", add_help=False)


def _port_pair(text: str) -> tuple[str, int]:
    name, sep, port = text.partition("=")
    if not sep or name not in DEFAULT_PORTS or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected SERVICE=PORT with SERVICE one of {', '.join(SERVICES)}; got {text!r}"
        )
    return name, int(port)


def _service_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown service(s) {unknown or text!r}; choose from {', '.join(SERVICES)}")
    return names


def _up(args: argparse.Namespace) -> int:
    from cli.up import up
    from cli.up_options import ROLES, UpOptions

    if args.role == "node" and not args.nats_url:
        print(
            "strata up: --role node joins an existing cluster: give its address with --nats-url nats://HOST:4222",
            file=sys.stderr,
        )
        return 2
    return up(
        UpOptions(
            data_dir=args.data_dir,
            nats_url=args.nats_url,
            nats_port=args.nats_port,
            nats_monitor_port=args.nats_monitor_port,
            host=args.host,
            ports=dict(args.port),
            services=args.services or ROLES[args.role],
            wait_timeout_s=args.wait_timeout,
            role=args.role,
            serve_builtin=args.serve_builtin and args.role == "all",
            secure_nats=args.secure_nats,
            nats_tls=args.nats_tls,
            nats_tls_cert=args.nats_tls_cert,
            nats_tls_key=args.nats_tls_key,
            nats_tls_ca=args.nats_tls_ca,
            admission_policy=args.admission_policy,
            api_keys=args.api_keys,
            https=args.https,
            https_cert=args.https_cert,
            https_key=args.https_key,
            https_ca=args.https_ca,
        )
    )


def _serve(args: argparse.Namespace) -> int:
    from shared.service import load, run

    run(load(args.service))
    return 0


def subject_table() -> str:
    from shared.contracts.subjects_doc import subjects_markdown

    return subjects_markdown()


async def _health(nats_url: str | None, timeout: float, data_dir: Path | None = None) -> int:
    from nats.errors import NoRespondersError, TimeoutError

    from shared import subjects
    from shared.errors import StrataError

    try:
        nc = await connection.connect(nats_url, data_dir, connect_timeout=timeout, allow_reconnect=False)
    except StrataError as exc:
        print(f"strata health: {exc.message}", file=sys.stderr)
        return 1
    failed = 0
    try:
        for name in SERVICES:
            try:
                reply = await nc.request(subjects.rpc(name, "health"), b"", timeout=timeout)
            except (TimeoutError, NoRespondersError):
                print(f"{name:<20}{'no answer':<10}")
                failed += 1
                continue
            health = json.loads(reply.data)
            print(f"{name:<20}{health['status']:<10}node {health['node']}  up {health['uptime_s']:.0f}s")
            failed += health["status"] != "ok"
    finally:
        await nc.close()
    return 1 if failed else 0
