"""Commands of hardware-inventory: nodes, fit, deploy, undeploy, deployments."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from cli import runner
from shared.contracts import RpcOp
from shared.contracts import hardware_inventory as inventory
from shared.quantization import QUANTIZATIONS

SERVICE = "hardware-inventory"


def register(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        runner.add_options(p, timeout=10.0, waits_for="the registry")
        p.add_argument("--json", action="store_true", help="print the raw answer as JSON")
        return p

    nodes = common(sub.add_parser("nodes", help="every node, its devices, free and booked memory"))
    nodes.set_defaults(func=lambda a: _run(a, _nodes))

    fit = common(sub.add_parser("fit", help="predicted memory of a model on every node and device, with the verdict"))
    fit.add_argument("ref", help="NAME, NAME:VERSION or NAME@ALIAS")
    _shape_args(fit)
    fit.set_defaults(func=lambda a: _run(a, _fit))

    deploy = common(
        sub.add_parser("deploy", help="place a model and wait until every replica is loaded (or say why not)")
    )
    deploy.add_argument("ref", help="NAME, NAME:VERSION or NAME@ALIAS")
    deploy.add_argument("--replicas", type=_positive, default=1)
    deploy.add_argument("--policy", choices=["binpack", "spread"])
    deploy.add_argument(
        "--no-wait", action="store_true", help="return once every replica is placed, before the workers load it"
    )
    deploy.add_argument(
        "--load-timeout", type=float, default=600.0, help="seconds to wait for the workers to load it (default 600)"
    )
    deploy.add_argument(
        "--embedding-pooling",
        choices=["last", "mean"],
        help="how /v1/embeddings pools (default: the checkpoint's sentence-transformers config, else last token)",
    )
    deploy.add_argument(
        "--on-demand",
        action="store_true",
        help="load it at its first request, not now; unload it when idle "
        "(--keep-alive); the least recently used on-demand model is evicted when another needs the memory",
    )
    deploy.add_argument(
        "--keep-alive",
        type=_duration,
        metavar="DURATION",
        help="on-demand: idle time before unloading, e.g. 30s, 5m, 1h, 0 (default 5m)",
    )
    _shape_args(deploy)
    deploy.set_defaults(func=lambda a: _run(a, _deploy))

    undeploy = common(
        sub.add_parser("undeploy", help="undeploy every deployment of a model (or one, by --id) and free its memory")
    )
    undeploy.add_argument("ref", nargs="?", help="NAME, NAME:VERSION or NAME@ALIAS")
    undeploy.add_argument("--id", dest="deployment_id", help="one deployment id")
    undeploy.set_defaults(func=lambda a: _run(a, _undeploy))

    deployments = common(sub.add_parser("deployments", help="every deployment, its replicas and their memory"))
    deployments.set_defaults(func=lambda a: _run(a, _deployments))


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=_positive, help="context length in tokens (default: the model's)")
    p.add_argument("--batch", type=_positive, default=1, help="sequences at full context at once")
    p.add_argument(
        "--dtype",
        help="compute dtype (default: a 16-bit checkpoint's on GPU, on CPU the node's fastest "
        "16-bit dtype for a 16-bit checkpoint; float32 only for an fp32 checkpoint on CPU or on request)",
    )
    p.add_argument(
        "--quantize", choices=QUANTIZATIONS, help="weight-only quantization of the linear layers (default: none)"
    )
    p.add_argument(
        "--constraint",
        "-c",
        action="append",
        default=[],
        type=_constraint,
        metavar="KEY=VALUE",
        help=(
            "gpu.product=H100, device=cpu|cuda, node=ID, hostname=H, gpu.uuid=U, "
            "gpu.compute_capability=8.0 (minimum), label.NAME=V"
        ),
    )


def _duration(text: str) -> float:
    """``30``, ``30s``, ``5m``, ``1h`` (Ollama's keep-alive spellings, negative ones aside) as seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    number, unit = text.strip(), "s"
    for suffix in sorted(units, key=len, reverse=True):
        if number.endswith(suffix):
            number, unit = number[: -len(suffix)], suffix
            break
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30s, 5m or 1h, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _constraint(text: str) -> tuple[str, str]:
    from services.hardware_inventory.api import parse_constraint
    from shared.errors import Invalid

    try:
        return parse_constraint(text)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _run(args: argparse.Namespace, command: runner.Command) -> int:
    def error_line(exc, connected: bool) -> str:  # a failed connection's code adds nothing to its message
        return f"strata {args.command}: {f'{exc.code}: ' if connected else ''}{exc.message}"

    return runner.run(args, command, error_line=error_line, connect_timeout=min(args.timeout, 5), allow_reconnect=False)


async def _call(nc, args, op: RpcOp, **fields):
    return await runner.call(nc, op, timeout=args.timeout, **fields)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _console():
    from rich.console import Console

    return Console(width=160)


async def _nodes(nc, args) -> int:
    from rich.table import Table

    result = await _call(nc, args, inventory.NODES)
    if args.json:
        return runner.print_json(result)
    table = Table(title="nodes")
    for col in (
        "node",
        "status",
        "host",
        "device",
        "name",
        "total",
        "booked",
        "available",
        "util",
        "last beat",
        "labels",
    ):
        table.add_column(col, justify="right" if col in ("total", "booked", "available", "util") else "left")
    for view in result.nodes:
        n = view.node
        for i, d in enumerate(n.devices):
            util = view.utilisation.get(d.id)
            beat = "-" if view.seconds_since_heartbeat is None else f"{view.seconds_since_heartbeat:.1f}s ago"
            table.add_row(
                n.node_id if i == 0 else "",
                ("[green]" if n.status == "alive" else "[red]") + n.status if i == 0 else "",
                n.hostname if i == 0 else "",
                d.id,
                d.name,
                _gb(d.memory_total),
                _gb(view.booked.get(d.id, 0)),
                _gb(view.available.get(d.id)),
                "-" if util is None else f"{util:.0%}",
                beat if i == 0 else "",
                ",".join(f"{k}={v}" for k, v in n.labels.items()) if i == 0 else "",
            )
    _console().print(table if result.nodes else "no nodes registered")
    return 0


def _constraints(args) -> dict[str, str]:
    return dict(args.constraint)


async def _fit(nc, args) -> int:
    from rich.table import Table

    report = await _call(
        nc,
        args,
        inventory.FIT,
        model_ref=args.ref,
        context_length=args.context,
        batch=args.batch,
        dtype=args.dtype,
        quantize=args.quantize,
        constraints=_constraints(args),
    )
    if args.json:
        runner.print_json(report)
        return 1 if report.refused else 0
    if report.refused:
        print(
            f"strata fit: {report.model.name}:{report.model.version} ({report.architecture}): "
            f"refused: {report.refused}",
            file=sys.stderr,
        )
        return 1
    console = _console()
    terms = Table(
        title=(
            f"{report.model.name}:{report.model.version} ({report.architecture}), "
            f"context {report.context_length} x batch {report.batch}"
        )
    )
    for col in (
        "device kind",
        "dtype",
        "weights",
        "KV cache",
        "activations",
        "workspace",
        "formula",
        "corrected",
        "+ runtime",
        "booked",
        "correction",
    ):
        terms.add_column(col, justify="left" if col in ("device kind", "dtype", "correction") else "right")
    for kind, e in report.estimates.items():
        r = e.corrected
        terms.add_row(
            kind,
            r.dtype + (f" + {r.quantize}" if r.quantize else ""),
            _gb(r.weights),
            _gb(r.kv_cache),
            _gb(r.activations),
            _gb(r.workspace),
            _gb(e.raw_total),
            _gb(e.total),
            _gb(r.runtime_overhead),
            _gb(e.booked),
            e.correction_note,
        )
    console.print(terms)
    rows = Table(title="verdict per device")
    for col in ("node", "device", "name", "needs", "available", "usable", "verdict"):
        rows.add_column(col, justify="right" if col in ("needs", "available", "usable") else "left")
    for row in report.rows:
        rows.add_row(
            row.node_id,
            row.device,
            row.name,
            _gb(row.need),
            _gb(max(row.available, 0)),
            _gb(row.capacity),
            ("[green]" if row.fits else "[red]") + row.reason,
        )
    console.print(rows)
    return 0


async def _deploy(nc, args) -> int:
    """Publish deploy.requested, then follow the deployment: every replica placed (or the rejection),
    then, unless --no-wait, every replica loaded by its worker (deploy.ready) or the first failure
    (deploy.failed, with the worker's reason: exit 1)."""
    from shared import bus, subjects
    from shared.events import DeployRequested, Source, make_event, parse_event

    request = DeployRequested(
        model_ref=args.ref,
        replicas=args.replicas,
        constraints=_constraints(args),
        context_length=args.context,
        batch=args.batch,
        policy=args.policy,
        dtype=args.dtype,
        embedding_pooling=args.embedding_pooling,
        quantize=args.quantize,
        on_demand=args.on_demand,
        keep_alive_s=args.keep_alive,
    )
    if args.keep_alive is not None and not args.on_demand:
        print("strata deploy: --keep-alive is for on-demand deployments (add --on-demand)", file=sys.stderr)
        return 2
    event = make_event(request, Source(service="cli", node=socket.gethostname()))
    heard: asyncio.Queue = asyncio.Queue()

    async def on_event(msg) -> None:
        answer = parse_event(msg.data, msg.subject)
        if answer.data.deployment_id == request.deployment_id:
            await heard.put(answer)

    followed = ["scheduled", "rejected"] if args.no_wait else ["scheduled", "rejected", "ready", "failed"]
    subs = [await nc.subscribe(subjects.event(f"deploy.{name}"), cb=on_event) for name in followed]
    await bus.publish_js(nc.jetstream(), event)
    placed: dict[tuple[str, str], Any] = {}  # (node, device) -> deploy.scheduled
    ready: dict[tuple[str, str], Any] = {}  # (node, device) -> deploy.ready
    phase, deadline = "placement", asyncio.get_running_loop().time() + args.timeout
    try:
        while len(placed) < request.replicas or (not args.no_wait and len(ready) < request.replicas):
            if len(placed) == request.replicas and phase == "placement":
                phase, deadline = "loading", asyncio.get_running_loop().time() + args.load_timeout
                _say_placed(placed.values(), request.replicas)
            answer = await asyncio.wait_for(heard.get(), max(deadline - asyncio.get_running_loop().time(), 0))
            data = answer.data
            if answer.type == "deploy.rejected":
                print(f"rejected: {data.reason}", file=sys.stderr)
                return 1
            if answer.type == "deploy.failed":
                print(
                    f"strata deploy: the replica on {data.node_id} failed to load: {data.reason} "
                    f"(deployment {request.deployment_id}; `strata deployments` shows it)",
                    file=sys.stderr,
                )
                return 1
            (placed if answer.type == "deploy.scheduled" else ready)[(data.node_id, data.device)] = data
    except TimeoutError:
        waiting = (
            f"{SERVICE} to place it"
            if phase == "placement"
            else f"the workers to load it ({len(ready)} of {request.replicas} ready)"
        )
        limit = args.timeout if phase == "placement" else args.load_timeout
        print(
            f"strata deploy: waited {limit:g}s for {waiting} (deployment {request.deployment_id}; "
            "`strata deployments` shows where it is)",
            file=sys.stderr,
        )
        return 1
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return _deployed(args, request.deployment_id, list(placed.values()), ready)


def _say_placed(placed, replicas: int) -> None:
    where = ", ".join(f"{s.node_id}/{s.device}" for s in placed)
    print(
        f"placed {replicas} replica(s) on {where}; waiting for the workers to load it (--no-wait returns here)",
        file=sys.stderr,
    )


def _deployed(args, deployment_id: str, scheduled: list, ready: dict) -> int:
    if args.json:
        return runner.print_json(
            [
                {
                    **s.model_dump(mode="json"),
                    "ready": (r := ready.get((s.node_id, s.device))) and r.model_dump(mode="json"),
                }
                for s in scheduled
            ]
        )
    from rich.table import Table

    table = Table(title=f"deployment {deployment_id}: {args.ref}")
    for col in (
        "replica",
        "node",
        "device",
        "dtype",
        "context",
        "predicted",
        "booked",
        "status",
        "measured peak",
        "load",
    ):
        table.add_column(col)
    for s in sorted(scheduled, key=lambda s: s.replica):
        r = ready.get((s.node_id, s.device))
        status = ("ready (on-demand, not loaded)" if r.on_demand else "ready") if r else "placed"
        table.add_row(
            str(s.replica),
            s.node_id,
            s.device,
            s.dtype or "",
            str(s.context_length),
            _gb(s.predicted_bytes),
            _gb(s.booked_bytes),
            status,
            _gb(r.measured.peak) if r and not r.on_demand else "-",
            f"{r.load_seconds:.1f}s" if r and not r.on_demand else "-",
        )
    _console().print(table)
    return 0


def _on_demand(deployment) -> str:
    """``keep-alive 5m`` for an on-demand deployment, ``-`` for an always-loaded one."""
    if not deployment.on_demand:
        return "-"
    s = deployment.keep_alive_s
    return (
        f"keep-alive {s / 3600:g}h"
        if s >= 3600 and s % 3600 == 0
        else f"keep-alive {s / 60:g}m"
        if s >= 60 and s % 60 == 0
        else f"keep-alive {s:g}s"
    )


def _status(deployment, replica) -> str:
    """An on-demand replica's status says whether its weights are in memory now."""
    if not deployment.on_demand or replica.status != "ready":
        return replica.status
    return "ready, loaded" if replica.loaded else "ready, unloaded"


async def undeploy(nc, *, model_ref: str | None = None, deployment_id: str | None = None, timeout: float):
    """Undeploy every deployment of ``model_ref`` (or the one ``deployment_id``) and free its memory:
    what `strata undeploy` and `strata up`'s built-in deploy both do. NotFound when there is none."""
    return await runner.call(nc, inventory.UNDEPLOY, model_ref=model_ref, deployment_id=deployment_id, timeout=timeout)


async def _undeploy(nc, args) -> int:
    if not args.ref and not args.deployment_id:
        print("strata undeploy: name a model (REF) or a deployment (--id)", file=sys.stderr)
        return 2
    result = await undeploy(nc, model_ref=args.ref, deployment_id=args.deployment_id, timeout=args.timeout)
    if args.json:
        return runner.print_json(result)
    print(f"undeployed {len(result.released)}: {', '.join(result.released)}")
    return 0


async def _deployments(nc, args) -> int:
    from rich.table import Table

    result = await _call(nc, args, inventory.DEPLOYMENTS)
    if args.json:
        return runner.print_json(result)
    table = Table(title="deployments")
    for col in (
        "deployment",
        "model",
        "state",
        "on-demand",
        "replica",
        "status",
        "node",
        "device",
        "runtime",
        "predicted",
        "measured",
        "booked",
    ):
        table.add_column(col)
    for d in result.deployments:
        for r in d.replicas:
            first = r.index == 0
            table.add_row(
                d.deployment_id[:12] if first else "",
                f"{d.model_ref} (v{d.model.version})" if first else "",
                d.state if first else "",
                _on_demand(d) if first else "",
                str(r.index),
                _status(d, r),
                r.node_id or "-",
                r.device or "-",
                r.runtime or "-",
                _gb(r.predicted_bytes),
                _gb(r.measured_peak),
                _gb(r.booked_bytes),
            )
    _console().print(table if result.deployments else "no deployments")
    return 0
