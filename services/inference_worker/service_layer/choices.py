"""A request's ``n`` choices: n engine requests sampled in the same batches (the engine's one sampling
path), each with its own seed, tracked as one request. Choice 0 is the request itself: its engine id
is the request id and its seed the request's, so ``n`` = 1 is exactly the request as it always was."""

from __future__ import annotations

import dataclasses
import json

from shared.inference import SamplingOptions
from shared.structured import ResponseFormat
from services.inference_worker.engine import Constraint, SamplingParams, StreamEvent

_MIX = 0x9E3779B97F4A7C15  # splitmix64's increment


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice 0 keeps ``seed``; choice i > 0 gets a seed derived from it (splitmix64 of seed and i), so a
    seeded request is reproducible and its choices differ. Unseeded choices stay unseeded."""
    if seed is None or choice == 0:
        return seed
    z = (seed + choice * _MIX) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1  # fits torch.Generator.manual_seed


def engine_ids(request_id: str, n: int) -> list[str]:
    return [request_id] + [f"{request_id}#{i}" for i in range(1, n)]


def format_constraint(response_format: ResponseFormat | None) -> Constraint | None:
    schema = response_format.output_schema() if response_format is not None else None
    if schema is None:
        return None
    return Constraint("json") if schema == {"type": "object"} else Constraint("json_schema", json.dumps(schema))


def to_params(options: SamplingOptions, choice: int = 0, constraint: Constraint | None = None) -> SamplingParams:
    """``constraint``: the request's own (its forced tool call's), else its response_format's."""
    extra = {
        k: v
        for k, v in (
            ("presence_penalty", options.presence_penalty),
            ("frequency_penalty", options.frequency_penalty),
            ("repetition_penalty", options.repetition_penalty),
            ("logit_bias", options.logit_bias),
            ("min_p", options.min_p),
            ("constraint", constraint or format_constraint(options.response_format)),
        )
        if v is not None
    }
    return SamplingParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        seed=choice_seed(options.seed, choice),
        stop=list(options.stop),
        stop_token_ids=list(options.stop_token_ids),
        logprobs=options.logprobs,
        **extra,
    )


class Finals:
    """Each choice's final event; ``merged`` is the request's: choice 0's, with every choice's generated
    tokens counted (the prompt once), and the first error if any choice failed."""

    def __init__(self, n: int) -> None:
        self.events: list[StreamEvent | None] = [None] * n

    def add(self, choice: int, event: StreamEvent) -> None:
        self.events[choice] = event

    @property
    def done(self) -> bool:
        return all(e is not None for e in self.events)

    def merged(self) -> StreamEvent:
        events = [e for e in self.events if e is not None]
        first = events[0]
        failed = next((e for e in events if e.finish_reason == "error"), None)
        metrics = dataclasses.replace(
            first.metrics, num_generated_tokens=sum(e.metrics.num_generated_tokens for e in events)
        )
        if failed is not None:
            return dataclasses.replace(first, finish_reason="error", error=failed.error, metrics=metrics)
        return dataclasses.replace(first, metrics=metrics)


__all__ = ["Finals", "choice_seed", "engine_ids", "to_params"]
