"""Learning from measurements: per (architecture, dtype, device kind), how far the fit formula is off.

Weights are known almost exactly (safetensors sizes), and the KV cache is not a guess at all: the
worker allocates exactly the bytes it is booked and its context is what that cache holds. So only two
factors are learned from each deploy.ready measurement, and neither touches the KV cache:

* ``weights_factor`` = measured weights / predicted weights,
* ``overhead_factor`` = (measured peak - measured weights - measured KV cache) / (predicted activations
  + workspace).

(Scaling the KV cache too fed every measurement back into the next booking: a worker measures the
cache it was given, so a low reading shrank the next cache, and the context with it, 256 -> 224 ->
176 -> 144.)

Only meaningful measurements are learned from; any other is ignored (IgnoredMeasurement): its figures
change nothing and are not kept, only a count and the last reason, so that `strata fit` can say why
there is no correction:

* a term is learned from only when both its predicted and its measured size reach
  ``MIN_MEANINGFUL_BYTES`` (64 MiB): below that, allocator granularity, reused freed pages and the
  process's own growth are as large as the term itself (the built-in model's 17.5 MiB reading against
  208 MiB predicted, +1091 %, said nothing about the formula);
* the measured peak must lie within ``MAX_RATIO`` (3x) of the formula's total either way: the
  formula's terms are arithmetic over the model's shape, so a larger gap means the probe missed or
  double-counted memory (another process, a reused arena), not that the formula is that wrong.

Each factor is an exponentially weighted mean (the first measurement counts fully, later ones with
weight ``max(1/n, ALPHA)``) clamped to [``MIN_FACTOR``, ``MAX_FACTOR``] = [0.5, 2]: a correction
adjusts the formula, it does not replace it. Because the correction scales terms rather than adding
a constant, it carries over to other context lengths and batch sizes of the same kind of model, and
the same model on the same hardware is booked the same KV cache (the same context) on every deploy.

The Correction record is the inventory's contract (shared/inventory.py); here is how it is learnt and applied.
"""

from __future__ import annotations

import math

from shared.inventory import Correction, FitEstimate

ALPHA = 0.3
MIN_FACTOR, MAX_FACTOR = 0.5, 2.0
MIN_MEANINGFUL_BYTES = 64 * 2**20
MAX_RATIO = 3.0


class IgnoredMeasurement(ValueError):
    """A deploy.ready measurement that teaches nothing (too small, too far off, or impossible); the
    message says which. It is logged and not stored."""


def apply(correction: Correction, estimate: FitEstimate) -> FitEstimate:
    """The estimate with its terms scaled by what measurements taught."""
    if correction.samples == 0:
        return estimate
    f = correction.overhead_factor
    return estimate.model_copy(
        update={
            "weights": math.ceil(estimate.weights * correction.weights_factor),
            "activations": math.ceil(estimate.activations * f),
            "workspace": math.ceil(estimate.workspace * f),
        }
    )


def learn(
    correction: Correction,
    raw: FitEstimate,
    scheduled_total: int,
    measured_weights: int,
    measured_kv_cache: int,
    measured_peak: int,
    sample_id: str,
) -> Correction:
    """Fold in one measurement, or raise IgnoredMeasurement. ``raw`` is the uncorrected formula for
    the deployment's settings, ``scheduled_total`` what was predicted (corrected) when it was scheduled."""
    if sample_id in correction.applied:
        return correction
    if measured_peak <= 0 or measured_weights + measured_kv_cache > measured_peak:
        raise IgnoredMeasurement(
            f"implausible: weights {measured_weights} B and KV cache "
            f"{measured_kv_cache} B exceed the peak of {measured_peak} B"
        )
    w_obs = _observed(measured_weights, raw.weights)
    o_obs = _observed(measured_peak - measured_weights - measured_kv_cache, raw.activations + raw.workspace)
    if w_obs is None and o_obs is None:
        raise IgnoredMeasurement(
            f"too small to learn from: weights and overhead each under {_mib(MIN_MEANINGFUL_BYTES)} "
            f"predicted or measured (peak {_mib(measured_peak)}, formula {_mib(raw.total)})"
        )
    if not 1 / MAX_RATIO <= measured_peak / raw.total <= MAX_RATIO:
        raise IgnoredMeasurement(
            f"too far from the formula: a peak of {_mib(measured_peak)} against {_mib(raw.total)} "
            f"(more than {MAX_RATIO:g}x either way): the probe missed or double-counted memory"
        )
    n = correction.samples + 1
    alpha = max(1.0 / n, ALPHA)
    error = (scheduled_total - measured_peak) / measured_peak
    last_mean = correction.mean_abs_error
    mean = abs(error) if last_mean is None else last_mean + (abs(error) - last_mean) / n
    return correction.model_copy(
        update={
            "samples": n,
            "weights_factor": correction.weights_factor
            if w_obs is None
            else (1 - alpha) * correction.weights_factor + alpha * w_obs,
            "overhead_factor": correction.overhead_factor
            if o_obs is None
            else (1 - alpha) * correction.overhead_factor + alpha * o_obs,
            "last_raw_error": (raw.total - measured_peak) / measured_peak,
            "last_error": error,
            "mean_abs_error": mean,
            "applied": [*correction.applied, sample_id][-256:],
        }
    )


def ignore(correction: Correction, why: IgnoredMeasurement, sample_id: str) -> Correction:
    """Count a measurement that was not learned from; its figures are not kept."""
    if sample_id in correction.applied:
        return correction
    return correction.model_copy(
        update={
            "ignored": correction.ignored + 1,
            "last_ignored": str(why),
            "applied": [*correction.applied, sample_id][-256:],
        }
    )


def note(raw: FitEstimate, correction: Correction | None) -> str:
    """Why the estimate is (not) corrected, for `strata fit`."""
    if correction is None or (correction.samples == 0 and correction.ignored == 0):
        return "no correction yet: no measurement of this architecture, dtype and device kind"
    if correction.samples == 0:
        plural = "" if correction.ignored == 1 else "s"
        return f"no correction: {correction.ignored} measurement{plural} ignored, the last as {correction.last_ignored}"
    factor = apply(correction, raw).total / raw.total
    plural = "" if correction.samples == 1 else "s"
    ignored = f", {correction.ignored} ignored" if correction.ignored else ""
    return (
        f"corrected by x{factor:.2f} from {correction.samples} measurement{plural}{ignored} "
        f"(weights x{correction.weights_factor:.2f}, activations and workspace x{correction.overhead_factor:.2f}, "
        f"KV cache as booked); last error {100 * (correction.last_error or 0):+.1f}%"
    )


def _observed(measured: int, predicted: int) -> float | None:
    """measured / predicted for one term, clamped; None when either is too small to mean anything."""
    if measured < MIN_MEANINGFUL_BYTES or predicted < MIN_MEANINGFUL_BYTES:
        return None
    return _clamp(measured / predicted)


def _clamp(value: float) -> float:
    return min(MAX_FACTOR, max(MIN_FACTOR, value))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
