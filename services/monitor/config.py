"""The monitor's own settings (``STRATA_MONITOR_*``), beside the shared ones every service reads."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

DEFAULT_RULES = Path(__file__).parent / "rules.yaml"


class MonitorConfig(BaseModel):
    rules_file: Path = DEFAULT_RULES
    evaluate_every_s: float = Field(default=1.0, gt=0, description="how often the alert rules are evaluated")
    push_every_s: float = Field(default=1.0, gt=0, description="how often the dashboard's SSE stream sends a snapshot")
    stream_max_s: float = Field(
        default=20.0, gt=0, le=20.0, description="the longest an SSE stream lasts before the browser reconnects"
    )
    poll_ledger_every_s: float = Field(default=5.0, gt=0, description="how often the ledger consumer's lag is read")
    ledger_durable: str = "provenance-ledger-log"
    events_durable: str = Field(
        default="monitor",
        min_length=1,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="the monitor's durable on EVENTS; its ack floor is where a restart's replay stops",
    )
    history_s: float = Field(default=300.0, gt=0, description="how far back the dashboard's charts reach")
    bucket_s: float = Field(default=5.0, gt=0, description="the width of one chart point")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> MonitorConfig:
        env = os.environ if environ is None else environ
        names = {
            "rules_file": "RULES",
            "evaluate_every_s": "EVALUATE_EVERY_S",
            "push_every_s": "PUSH_EVERY_S",
            "stream_max_s": "STREAM_MAX_S",
            "poll_ledger_every_s": "POLL_LEDGER_EVERY_S",
            "history_s": "HISTORY_S",
            "bucket_s": "BUCKET_S",
            "events_durable": "EVENTS_DURABLE",
        }
        values = {field: env[f"STRATA_MONITOR_{key}"] for field, key in names.items() if f"STRATA_MONITOR_{key}" in env}
        return cls.model_validate(values)
