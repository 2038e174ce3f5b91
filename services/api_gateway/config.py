"""The gateway's own settings (``STRATA_API_GATEWAY_*``, and ``STRATA_API_KEYS``), beside the shared ones
every service reads."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from shared.inference import SILENCE_TIMEOUT_S

from services.api_gateway.adapters.quota_counters import QUOTA_TTL_S
from services.api_gateway.service_layer.metering import SETTLE_WAIT_S

MAX_BODY_BYTES = 512 * 1024
NATS_HEADROOM_BYTES = 64 * 1024  # what an InferenceRequest adds to the body it came from (ids, headers)


class GatewayConfig(BaseModel):
    """Read from ``STRATA_API_GATEWAY_*`` (and ``STRATA_API_KEYS``) by ``from_env``."""

    max_in_flight: int = Field(default=64, ge=1, description="requests carried at once; more get 429")
    # a reservation must outlive its request (and the wait for its settling event) in the quota counters
    request_timeout_s: float = Field(default=600.0, gt=0, lt=QUOTA_TTL_S - SETTLE_WAIT_S,
                                     description="the longest a whole request may take (504)")
    silence_timeout_s: float = Field(
        default=SILENCE_TIMEOUT_S, gt=0, description="a worker silent this long is dead (502)"
    )
    seed_keys: list[str] = Field(
        default=[], description="raw keys this gateway alone honours as inference keys (STRATA_API_KEYS)"
    )
    max_body_bytes: int = Field(
        default=MAX_BODY_BYTES,
        ge=1024,
        description=(
            "the largest request body accepted (413 above it); "
            "never more than one NATS message carries (see body_limit)"
        ),
    )
    quota_max_tokens: int = Field(
        default=4096,
        ge=1,
        description=(
            "the max_tokens of a request without one, on a key with a tokens_per_minute quota: "
            "its reservation needs a bound"
        ),
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GatewayConfig:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        for field, var in (
            ("max_in_flight", "STRATA_API_GATEWAY_MAX_IN_FLIGHT"),
            ("request_timeout_s", "STRATA_API_GATEWAY_REQUEST_TIMEOUT_S"),
            ("silence_timeout_s", "STRATA_API_GATEWAY_SILENCE_TIMEOUT_S"),
            ("quota_max_tokens", "STRATA_API_GATEWAY_QUOTA_MAX_TOKENS"),
            ("max_body_bytes", "STRATA_API_GATEWAY_MAX_BODY_BYTES"),
        ):
            if env.get(var):
                values[field] = env[var]
        values["seed_keys"] = [k.strip() for k in env.get("STRATA_API_KEYS", "").split(",") if k.strip()]
        return cls.model_validate(values)
