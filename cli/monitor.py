"""``strata top``: a live terminal view of the monitor (nodes, deployments, models, alerts, ledger),
read from the monitor's HTTP API (``GET /api/state``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shared import endpoints, http_tls
from shared.config import DEFAULT_PORTS

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORTS['monitor']}"
STATE_COLOURS = {
    "ready": "green",
    "up": "green",
    "ok": "green",
    "failed": "red",
    "rejected": "red",
    "lost": "red",
    "critical": "red",
    "warning": "yellow",
    "loading": "yellow",
    "scheduled": "yellow",
    "requested": "yellow",
}


def register(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser(
        "top", help="live view of nodes, deployments, traffic, alerts and the ledger (from the monitor)"
    )
    top.add_argument(
        "--url",
        help="the monitor's HTTP address (default $STRATA_MONITOR_URL, else where "
        f"`strata up` serves it here, else {DEFAULT_URL})",
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument(
        "--https-ca",
        type=Path,
        metavar="FILE",
        help="the CA (PEM) of an HTTPS monitor (default $STRATA_HTTP_CA, else DATA_DIR/http/tls/ca.pem)",
    )
    top.set_defaults(func=_top)


def _top(args: argparse.Namespace) -> int:
    console = Console()
    args.url = args.url or endpoints.url("monitor", "STRATA_MONITOR_URL", DEFAULT_URL)
    try:
        verify = http_tls.client_verify(args.https_ca)
    except http_tls.TlsSetupError as exc:
        print(f"strata top: {exc}", file=sys.stderr)
        return 1
    with httpx.Client(base_url=args.url, timeout=5, verify=verify) as http:
        if args.once:
            try:
                console.print(render(_fetch(http)))
            except httpx.HTTPError as exc:
                print(
                    f"strata top: the monitor at {args.url}: "
                    f"{http_tls.failure(exc, args.url) or f'did not answer: {exc}'}",
                    file=sys.stderr,
                )
                return 1
            return 0
        with Live(Text("connecting…"), console=console, screen=False, auto_refresh=False) as live:
            try:
                while True:
                    try:
                        live.update(render(_fetch(http)), refresh=True)
                    except httpx.HTTPError as exc:
                        if reason := http_tls.failure(exc, args.url):  # retrying cannot fix it
                            live.stop()
                            print(f"strata top: the monitor at {args.url}: {reason}", file=sys.stderr)
                            return 1
                        live.update(
                            Text(f"the monitor at {args.url} did not answer ({exc}); retrying…", style="red"),
                            refresh=True,
                        )
                    time.sleep(args.interval)
            except KeyboardInterrupt:
                return 0


def _fetch(http: httpx.Client) -> dict:
    response = http.get("/api/state")
    response.raise_for_status()
    return response.json()


def _badge(text: str) -> Text:
    return Text(text, style=STATE_COLOURS.get(text, ""))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _secs(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _bar(fraction: float, width: int = 20) -> Text:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return Text("█" * filled, style="red" if fraction > 0.85 else "cyan") + Text("░" * (width - filled), style="dim")


def render(s: dict) -> Group:
    """One frame from a snapshot of ``GET /api/state``."""
    alerts = Table(box=None, show_header=False, expand=True)
    firing = [(r, f) for r in s["alerts"] for f in r["firing"]]
    for rule, f in firing:
        alerts.add_row(_badge(rule["severity"]), Text(rule["name"], style="bold"), f["summary"])
    if not firing:
        alerts.add_row(Text(f"all {len(s['alerts'])} rules ok", style="green"))

    models = Table(expand=True)
    for column in ("model", "req/s", "tok/s", "p50", "p95", "p99", "TTFT p50", "requests", "failed"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for m in s["models"]:
        models.add_row(
            m["model_name"],
            f"{m['requests_per_s']:.2f}",
            f"{m['tokens_per_s']:.1f}",
            _secs(m["p50_s"]),
            _secs(m["p95_s"]),
            _secs(m["p99_s"]),
            _secs(m["ttft_p50_s"]),
            str(m["requests"]),
            str(m["failed"]),
        )

    nodes = Table(expand=True)
    for column in ("node", "status", "device", "memory used", "", "busy"):
        nodes.add_column(column)
    for n in s["nodes"]:
        for i, d in enumerate(n["devices"] or [None]):
            head = (n["node_id"], _badge(n["status"])) if i == 0 else ("", "")
            if d is None:
                nodes.add_row(*head, "–", "", "", "")
                continue
            used = d["memory_total"] - d["memory_free"]
            busy = "–" if d["utilisation"] is None else f"{d['utilisation']:.0%}"
            nodes.add_row(
                *head,
                f"{d['id']} {d['name']}",
                _bar(used / d["memory_total"] if d["memory_total"] else 0),
                f"{_bytes(used)} / {_bytes(d['memory_total'])}",
                busy,
            )

    deployments = Table(expand=True)
    for column in ("model", "version", "state", "node", "device"):
        deployments.add_column(column)
    for d in s["deployments"]:
        deployments.add_row(
            d["model"],
            "–" if d["version"] is None else f"v{d['version']}",
            _badge(d["state"]),
            d["node_id"] or "–",
            d["device"] or "–",
        )

    ledger = s["ledger"]
    head = (
        f"tree size {ledger['tree_size']}  root {str(ledger['root_hash'])[:16]}…  key {ledger['key_id']}  "
        f"lag {ledger['lag'] if ledger['lag'] is not None else 'unknown'}"
        if ledger["tree_size"] is not None
        else "no signed head yet"
    )
    if ledger["tamper_detected"]:
        head += f"  TAMPER DETECTED ×{ledger['tamper_detected']}"
    dead = ", ".join(f"{svc}: {n}" for svc, n in s["dead_letters"].items()) or "none"
    return Group(
        Panel(alerts, title=f"alerts ({len(firing)} firing)", border_style="red" if firing else "green"),
        Panel(models, title="models (last 60 s)"),
        Panel(nodes, title="nodes"),
        Panel(deployments, title="deployments"),
        Panel(Text(f"{head}\ndead letters: {dead}\nevents seen: {s['events_seen']}"), title="ledger"),
    )
