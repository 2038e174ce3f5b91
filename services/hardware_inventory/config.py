"""hardware-inventory's own settings, from ``STRATA_INVENTORY_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from shared import subjects
from shared.inventory import Policy

Role = Literal["agent", "registry"]


class InventoryConfig(BaseModel):
    roles: frozenset[Role] = frozenset({"agent", "registry"})
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    missed_beats: int = Field(default=3, ge=1, description="beats missed before a node counts as lost")
    policy: Policy = "binpack"
    probe_file: Path | None = Field(default=None, description="a scripted node (StaticProbe) instead of this machine")
    labels: dict[str, str] = {}
    bucket: str = subjects.INVENTORY_BUCKET
    utilisation_cap: dict[str, float] = Field(
        default={"cuda": 0.92, "cpu": 0.85},
        description="share of a device's memory the registry books; the rest stays for the OS and others",
    )
    default_context: int | None = Field(
        default=None, ge=1, description="context when a request names none; None: the model's own"
    )
    evict_lru: bool = Field(default=False, description="evict the least recently used deployments to make room")
    rpc_timeout_s: float = 5.0
    admission_policy: Path | None = Field(
        default=None, description="the admission policy file (YAML); None or a missing file: no policy"
    )

    @field_validator("roles")
    @classmethod
    def _some_role(cls, roles: frozenset[str]) -> frozenset[str]:
        if not roles:
            raise ValueError("at least one role (agent, registry)")
        return roles

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> InventoryConfig:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if roles := env.get("STRATA_INVENTORY_ROLES"):
            values["roles"] = frozenset(r.strip() for r in roles.split(",") if r.strip())
        for key, name in (
            ("heartbeat_interval_s", "HEARTBEAT_S"),
            ("missed_beats", "MISSED_BEATS"),
            ("policy", "POLICY"),
            ("probe_file", "PROBE_FILE"),
            ("bucket", "BUCKET"),
            ("default_context", "DEFAULT_CONTEXT"),
        ):
            if value := env.get(f"STRATA_INVENTORY_{name}"):
                values[key] = value
        if labels := env.get("STRATA_INVENTORY_LABELS"):  # zone=a,rack=3
            values["labels"] = dict(pair.split("=", 1) for pair in labels.split(",") if "=" in pair)
        if policy := env.get("STRATA_ADMISSION_POLICY"):
            values["admission_policy"] = policy
        if env.get("STRATA_INVENTORY_EVICT_LRU", "").lower() in ("1", "true", "yes"):
            values["evict_lru"] = True
        return cls.model_validate(values)
