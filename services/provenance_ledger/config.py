"""The ledger's own settings (``STRATA_LEDGER_*``), beside the shared ones every service reads. A value
that is not a positive number stops the start with the variable's name (unset or empty: the default;
shared/config.py ``env_value``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.provenance_ledger.adapters.ingest import ACK_WAIT_S
from services.provenance_ledger.service_layer.ledger import CheckpointPolicy
from shared.config import env_value

EVERY_ENV, FULL_EVERY_ENV = "STRATA_LEDGER_VERIFY_SECONDS", "STRATA_LEDGER_FULL_VERIFY_SECONDS"


@dataclass(frozen=True)
class WatchSettings:
    every_s: float = 600.0  # new leaves re-hashed, heads checked
    full_every_s: float = 86_400.0  # every leaf re-hashed (and at every start)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WatchSettings:
        env = os.environ if environ is None else environ
        return cls(
            every_s=env_value(env, EVERY_ENV, cls.every_s, _seconds),
            full_every_s=env_value(env, FULL_EVERY_ENV, cls.full_every_s, _seconds),
        )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value > 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number of events") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


@dataclass(frozen=True)
class LedgerConfig:
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)  # when a tree head is signed
    # After a crash, the batch it had fetched but not acknowledged comes back only after the ack wait:
    # a shorter one catches up sooner, and a redelivery is appended once.
    ack_wait_s: float = ACK_WAIT_S
    watch: WatchSettings = field(default_factory=WatchSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LedgerConfig:
        env = os.environ if environ is None else environ
        policy = CheckpointPolicy(
            every_events=env_value(env, "STRATA_LEDGER_CHECKPOINT_EVENTS", CheckpointPolicy.every_events, _count),
            every_seconds=env_value(env, "STRATA_LEDGER_CHECKPOINT_SECONDS", CheckpointPolicy.every_seconds, _seconds),
        )
        ack_wait_s = env_value(env, "STRATA_LEDGER_ACK_WAIT_SECONDS", ACK_WAIT_S, _seconds)
        return cls(policy, ack_wait_s, WatchSettings.from_env(env))
