"""Admitting a request into an engine: its tools, each choice's sampling parameters and the messages for
the chat template, its grammar compiled (off the event loop, by the caller), then every choice submitted,
or none."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shared import errors
from shared.inference import InferenceRequest
from services.inference_worker.engine import ContextLengthError, InvalidRequestError, StreamEvent
from services.inference_worker.service_layer.choices import to_params
from services.inference_worker.service_layer.deployments import Deployment
from services.inference_worker.service_layer.tool_use import ToolUse, chat_messages


@dataclass
class Run:
    """An admitted request: the deployment running it and, with tools, how its output is parsed."""

    dep: Deployment
    tools: ToolUse | None = None


def prepare(request: InferenceRequest, dep: Deployment, n: int) -> tuple[Run, list, list[dict] | None]:
    """The request's tools, each choice's sampling parameters and the messages for the template; a
    constraint is compiled here (GrammarError: a 400 with its reason), so add_request finds it cached."""
    assert dep.loop is not None
    tokenizer = dep.loop.engine.tokenizer
    run = Run(dep, ToolUse.of(request, tokenizer))
    params = [to_params(request.sampling, choice) for choice in range(n)]
    if run.tools is not None:
        params = [run.tools.params(p) for p in params]
    if params[0].constraint is not None:
        try:
            dep.loop.engine.compile(params[0].constraint)
        except InvalidRequestError as exc:
            raise errors.Invalid(str(exc)) from None
    return run, params, chat_messages(request, tokenizer)


def submit(request: InferenceRequest, run: Run, ids: list[str], params: list, messages: list[dict] | None,
           events: asyncio.Queue[StreamEvent]) -> None:
    """Each choice into the engine, or none: a refusal cancels the ones already in."""
    loop = run.dep.loop
    assert loop is not None
    for choice, eid in enumerate(ids):
        try:
            loop.submit(asyncio.get_running_loop(), eid, params[choice], prompt=request.prompt, messages=messages,
                        events=events, tools=run.tools.tools if run.tools else None,
                        cap_max_tokens=request.sampling.cap_max_tokens)
        except Exception as exc:
            for submitted in ids[:choice]:
                loop.cancel(submitted)
            if isinstance(exc, ContextLengthError):  # refused before a stream's "started": a status
                raise errors.ContextLengthExceeded.of(exc.max_model_len, exc.prompt_tokens,
                                                      exc.completion_tokens) from None
            # a duplicate id inside the engine, a chat template that fails, a token id out of vocabulary
            raise errors.Invalid(f"cannot start the request: {exc}") from None
