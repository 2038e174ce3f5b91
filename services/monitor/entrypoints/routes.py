"""The monitor's HTTP routes: the alert rules, the dashboard's snapshot and its server-sent stream, and
the dashboard page. Each reads the started Monitor (503 while the service starts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from services.monitor.service_layer.monitor import Monitor
from services.monitor.service_layer.views import RuleView, Snapshot
from shared.service import part_of

STATIC = Path(__file__).parent / "static"
SSE_STREAM_MAX_S = 20.0  # a stream ends after this and the browser reconnects: a shutdown never waits on one

router = APIRouter(tags=["monitor"])
started_monitor = Depends(part_of(Monitor))


@router.get("/alerts", summary="Every alert rule with its state and firing instances")
async def alerts(monitor: Monitor = started_monitor) -> list[RuleView]:
    return monitor.rules()


@router.get("/api/state", summary="The dashboard's data: nodes, deployments, models, alerts, ledger")
async def state(monitor: Monitor = started_monitor) -> Snapshot:
    return monitor.snapshot()


@router.get("/api/stream", summary="The snapshot as server-sent events, one per push interval")
async def stream(
    request: Request,
    max_s: float = Query(
        SSE_STREAM_MAX_S, gt=0, le=SSE_STREAM_MAX_S, description="end the stream after this (the browser reconnects)"
    ),
    monitor: Monitor = started_monitor,
) -> StreamingResponse:
    return StreamingResponse(
        _snapshots(request, monitor, min(max_s, monitor.config.stream_max_s)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _snapshots(request: Request, monitor: Monitor, max_s: float) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    ends = time.monotonic() + max_s
    while time.monotonic() < ends and not await request.is_disconnected():
        yield f"event: snapshot\ndata: {monitor.pushed_snapshot()}\n\n"
        await asyncio.sleep(monitor.config.push_every_s)
