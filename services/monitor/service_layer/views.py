"""The monitor's API bodies (``GET /api/state``, the SSE stream, ``GET /alerts``), built from the state."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from pydantic import BaseModel

from services.monitor.adapters.replay import ReplayProgress
from services.monitor.domain.alerts import AlertEngine
from services.monitor.domain.state import FleetState


class DeviceView(BaseModel):
    id: str
    kind: str
    name: str
    memory_total: int
    memory_free: int
    utilisation: float | None = None


class NodeView(BaseModel):
    node_id: str
    hostname: str
    status: str  # "up" or "lost"
    last_seen_s: float | None
    ram_total: int
    ram_free: int
    loaded_models: list[str]
    devices: list[DeviceView]


class DeploymentView(BaseModel):
    deployment_id: str
    model: str
    version: int | None
    node_id: str | None
    device: str | None
    state: str
    reason: str | None
    runtime: str | None = None  # strata-engine or llama.cpp, from deploy.ready (#17)
    loaded: bool | None = None  # on-demand: whether its weights are in memory; None: not on-demand


class Point(BaseModel):
    t: float  # the end of the bucket, epoch seconds
    requests_per_s: float
    tokens_per_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None


class ModelView(BaseModel):
    model_name: str
    requests: int  # in the summary window
    failed: int
    requests_per_s: float
    tokens_per_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    ttft_p50_s: float | None
    series: list[Point]


class AlertInstanceView(BaseModel):
    labels: dict[str, str]
    value: float | None
    summary: str
    since: datetime


class RuleView(BaseModel):
    name: str
    kind: str
    severity: str
    state: str  # "firing" or "ok"
    window_s: float
    threshold: float
    firing: list[AlertInstanceView]


class LedgerView(BaseModel):
    tree_size: int | None
    root_hash: str | None
    key_id: str | None
    signature: str | None
    signed_at: datetime | None
    lag: int | None
    tamper_detected: int


class Snapshot(BaseModel):
    time: datetime
    nodes: list[NodeView]
    deployments: list[DeploymentView]
    models: list[ModelView]
    alerts: list[RuleView]
    ledger: LedgerView
    dead_letters: dict[str, int]
    events_seen: int
    replay: ReplayProgress | None = None  # how the state was rebuilt from EVENTS on start
    dead_letter_replay: ReplayProgress | None = None  # and the dead-letter counts from DEADLETTER


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def rules_view(engine: AlertEngine) -> list[RuleView]:
    views = []
    for rule in engine.rules:
        active = engine.active[rule.name].values()
        views.append(
            RuleView(
                name=rule.name,
                kind=rule.kind,
                severity=rule.severity,
                state="firing" if active else "ok",
                window_s=rule.window_s,
                threshold=rule.threshold,
                firing=[
                    AlertInstanceView(
                        labels=dict(a.instance.labels),
                        value=a.instance.value,
                        summary=a.instance.summary,
                        since=_dt(a.since),
                    )
                    for a in active
                ],
            )
        )
    return views


def model_view(
    state: FleetState, model: str, now: float, history_s: float, bucket_s: float, summary_s: float = 60.0
) -> ModelView:
    buckets = max(1, int(history_s // bucket_s))
    start = now - buckets * bucket_s
    series = [
        Point(
            t=round(start + (i + 1) * bucket_s, 3),
            requests_per_s=round(r.requests / bucket_s, 4),
            tokens_per_s=round(r.completion_tokens / bucket_s, 4),
            p50_s=_num(r.e2e_percentile(50)),
            p95_s=_num(r.e2e_percentile(95)),
            p99_s=_num(r.e2e_percentile(99)),
        )
        for i, r in enumerate(state.traffic.series(model, start, bucket_s, buckets))
    ]
    recent = state.window(now, summary_s, model)
    return ModelView(
        model_name=model,
        requests=recent.requests,
        failed=recent.failed,
        requests_per_s=round(recent.requests / summary_s, 4),
        tokens_per_s=round(recent.completion_tokens / summary_s, 4),
        p50_s=_num(recent.e2e_percentile(50)),
        p95_s=_num(recent.e2e_percentile(95)),
        p99_s=_num(recent.e2e_percentile(99)),
        ttft_p50_s=_num(recent.ttft_percentile(50)),
        series=series,
    )


def _deployed_name(state: FleetState, deployment_id: str) -> str:
    """Agents report the deployment ids a node holds; people read model:version."""
    d = state.deployments.get(deployment_id)
    if d is None:
        return deployment_id
    return d.model if d.version is None else f"{d.model}:{d.version}"


def snapshot(
    state: FleetState,
    engine: AlertEngine,
    now: float,
    history_s: float,
    bucket_s: float,
    replay: ReplayProgress | None = None,
    dead_letter_replay: ReplayProgress | None = None,
) -> Snapshot:
    nodes = [
        NodeView(
            node_id=n.node_id,
            hostname=n.hostname or n.node_id,
            status="lost" if n.lost else "up",
            last_seen_s=round(now - n.last_seen, 3) if n.last_seen else None,
            ram_total=n.ram_total,
            ram_free=n.ram_free,
            loaded_models=[_deployed_name(state, d) for d in n.loaded_models],
            devices=[
                DeviceView(
                    id=d.id,
                    kind=d.kind,
                    name=d.name,
                    memory_total=d.memory_total,
                    memory_free=d.memory_free,
                    utilisation=n.utilisation.get(d.id),
                )
                for d in n.devices.values()
            ],
        )
        for n in sorted(state.nodes.values(), key=lambda n: n.node_id)
    ]
    deployments = [
        DeploymentView(
            deployment_id=d.deployment_id,
            model=d.model,
            version=d.version,
            node_id=d.node_id,
            device=d.device,
            state=d.state,
            reason=d.reason,
            runtime=d.runtime,
            loaded=d.loaded,
        )
        for d in sorted(state.deployments.values(), key=lambda d: (d.model, d.deployment_id))
    ]
    ledger = state.ledger
    return Snapshot(
        time=_dt(now),
        nodes=nodes,
        deployments=deployments,
        models=[model_view(state, m, now, history_s, bucket_s) for m in state.models()],
        alerts=rules_view(engine),
        ledger=LedgerView(
            tree_size=ledger.tree_size,
            root_hash=ledger.root_hash,
            key_id=ledger.key_id,
            signature=ledger.signature,
            signed_at=_dt(ledger.signed_at) if ledger.signed_at else None,
            lag=ledger.lag,
            tamper_detected=len(ledger.tamper_events),
        ),
        dead_letters=dict(state.dead_letter_totals),
        events_seen=sum(state.events_seen.values()),
        replay=replay,
        dead_letter_replay=dead_letter_replay,
    )
