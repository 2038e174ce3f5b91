"""The worker's OpenTelemetry: the GenAI server metrics of each request, its span's end, and the
engine's phases as child spans."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import metrics, trace

from services.inference_worker.engine import RequestMetrics

tracer = trace.get_tracer("strata.inference-worker")


class GenAiMetrics:
    """The OpenTelemetry GenAI server metrics (semantic conventions: gen_ai.server.*), per request."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.duration = meter.create_histogram("gen_ai.server.request.duration", unit="s",
                                               description="Generative AI server request duration")
        self.ttft = meter.create_histogram("gen_ai.server.time_to_first_token", unit="s",
                                           description="Time to generate the first token")
        self.tpot = meter.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                           description="Time per output token after the first")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Input and output tokens used")

    def record(self, operation: str, model: str, served: str, e2e_s: float, ttft_s: float, tpot_s: float,
               prompt_tokens: int, completion_tokens: int, error: str | None = None) -> None:
        attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model, "gen_ai.response.model": served,
                 "gen_ai.system": "strata"}
        self.duration.record(e2e_s, {**attrs, "error.type": error} if error else attrs)
        if error:
            return
        self.ttft.record(ttft_s, attrs)
        self.tpot.record(tpot_s, attrs)
        self.tokens.record(prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.tokens.record(completion_tokens, {**attrs, "gen_ai.token.type": "output"})

    def record_embeddings(
        self, model: str, served: str, e2e_s: float, input_tokens: int, error: str | None = None
    ) -> None:
        """An embeddings request: its duration and input tokens (no first or output token to time)."""
        attrs = {
            "gen_ai.operation.name": "embeddings",
            "gen_ai.request.model": model,
            "gen_ai.response.model": served,
            "gen_ai.system": "strata",
        }
        self.duration.record(e2e_s, {**attrs, "error.type": error} if error else attrs)
        if not error:
            self.tokens.record(input_tokens, {**attrs, "gen_ai.token.type": "input"})


GENAI = GenAiMetrics(metrics.get_meter("strata.inference-worker"))


@contextmanager
def ended(span: trace.Span) -> Iterator[trace.Span]:
    try:
        yield span
    finally:
        span.end()


def engine_spans(parent: trace.Span, m: RequestMetrics) -> None:
    """The engine's phases of one request as child spans, from the timestamps the engine kept (its
    thread has no span of its own): waiting for a batch, the prefill up to the first token, the decode."""
    if not parent.is_recording():
        return
    ctx = trace.set_span_in_context(parent)
    phases = (
        ("engine queue", m.arrival_time, m.first_scheduled_time),
        ("engine prefill", m.first_scheduled_time, m.first_token_time),
        ("engine decode", m.first_token_time, m.finish_time),
    )
    for name, start, end in phases:
        if start is not None and end is not None:
            child = tracer.start_span(name, context=ctx, start_time=int(start * 1e9))
            if name == "engine decode":
                child.set_attribute("gen_ai.usage.output_tokens", m.num_generated_tokens)
            child.end(end_time=int(end * 1e9))
