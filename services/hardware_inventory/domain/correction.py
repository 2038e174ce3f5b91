"""Learning from measurements: per (architecture, dtype, device kind), how far the fit formula is off.

Weights are known almost exactly (safetensors sizes); what the formula guesses is the rest (KV
cache, activations, workspace). So two factors are learned from each deploy.ready measurement:

* ``weights_factor`` = measured weights / predicted weights,
* ``overhead_factor`` = (measured peak - measured weights) / (predicted total - predicted weights),

each an exponentially weighted mean (the first measurement counts fully, later ones with weight
``max(1/n, ALPHA)``) clamped to [``MIN_FACTOR``, ``MAX_FACTOR``] so one absurd report cannot make a
model unplaceable. Because the correction scales the terms rather than adding a constant, it carries
over to other context lengths and batch sizes of the same kind of model.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from services.hardware_inventory.domain.fit import FitEstimate

ALPHA = 0.3
MIN_FACTOR, MAX_FACTOR = 0.25, 4.0


def correction_key(architecture: str, dtype: str, device_kind: str) -> str:
    """A KV-safe key: ``LlamaForCausalLM.bfloat16.cuda``."""
    clean = lambda s: "".join(c if c.isalnum() or c in "-_" else "_" for c in s)  # noqa: E731
    return f"{clean(architecture)}.{clean(dtype)}.{clean(device_kind)}"


class Correction(BaseModel):
    model_config = ConfigDict(frozen=True)
    architecture: str
    dtype: str
    device_kind: str
    samples: int = Field(default=0, ge=0)
    weights_factor: float = 1.0
    overhead_factor: float = 1.0
    last_raw_error: float | None = Field(default=None, description="(formula - measured) / measured, last sample")
    last_error: float | None = Field(default=None, description="(prediction used at scheduling - measured) / measured")
    mean_abs_error: float | None = Field(default=None, description="mean |last_error| over every sample")
    applied: list[str] = Field(default=[], description="deployment replicas already learned from (idempotence)")

    @property
    def key(self) -> str:
        return correction_key(self.architecture, self.dtype, self.device_kind)

    def apply(self, estimate: FitEstimate) -> FitEstimate:
        """The estimate with its terms scaled by what measurements taught."""
        if self.samples == 0:
            return estimate
        f = self.overhead_factor
        return estimate.model_copy(update={
            "weights": math.ceil(estimate.weights * self.weights_factor),
            "kv_cache": math.ceil(estimate.kv_cache * f),
            "activations": math.ceil(estimate.activations * f),
            "workspace": math.ceil(estimate.workspace * f),
        })

    def learn(self, raw: FitEstimate, scheduled_total: int, measured_weights: int, measured_peak: int, sample_id: str) -> Correction:
        """Fold in one measurement. ``raw`` is the uncorrected formula for the deployment's settings,
        ``scheduled_total`` what was predicted (corrected) when it was scheduled."""
        if sample_id in self.applied:
            return self
        if measured_peak <= 0 or measured_weights > measured_peak:
            raise ValueError(f"implausible measurement: weights {measured_weights} B, peak {measured_peak} B")
        n = self.samples + 1
        alpha = max(1.0 / n, ALPHA)
        w_obs = _clamp(measured_weights / raw.weights) if raw.weights and measured_weights else self.weights_factor
        rest = raw.total - raw.weights
        o_obs = _clamp((measured_peak - measured_weights) / rest) if rest > 0 else self.overhead_factor
        error = (scheduled_total - measured_peak) / measured_peak
        mean = abs(error) if self.mean_abs_error is None else self.mean_abs_error + (abs(error) - self.mean_abs_error) / n
        return self.model_copy(update={
            "samples": n,
            "weights_factor": (1 - alpha) * self.weights_factor + alpha * w_obs,
            "overhead_factor": (1 - alpha) * self.overhead_factor + alpha * o_obs,
            "last_raw_error": (raw.total - measured_peak) / measured_peak,
            "last_error": error,
            "mean_abs_error": mean,
            "applied": [*self.applied, sample_id][-256:],
        })


def _clamp(value: float) -> float:
    return min(MAX_FACTOR, max(MIN_FACTOR, value))
