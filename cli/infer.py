"""``strata chat REF``, ``strata complete REF PROMPT`` and ``strata embed REF TEXT...``: talk to a deployed
model over NATS, through the same clients the api-gateway uses (shared/inference_client.py, shared/embeddings.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TextIO

from pydantic import ValidationError

from cli import connection, runner
from shared import embeddings, errors, inference_client
from shared.inference import ChatMessage, Chunk, End, InferenceRequest, SamplingOptions

EXIT_COMMANDS = ("/exit", "/quit")
CONNECT_OPTIONS = {"connect_timeout": 3, "max_reconnect_attempts": 2}


def register(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser(
        "chat", help="chat with a deployed model (streams; /exit or Ctrl-D leaves, Ctrl-C stops an answer)"
    )
    chat.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    chat.add_argument("--system", help="a system message that starts the conversation")
    _common(chat)
    chat.set_defaults(func=_chat)

    complete = sub.add_parser("complete", help="complete one prompt with a deployed model")
    complete.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    complete.add_argument("prompt")
    complete.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print tokens as they arrive (default) or the whole answer at the end",
    )
    _common(complete)
    complete.set_defaults(func=_complete)

    embed = sub.add_parser("embed", help="embed texts with a deployed model: one JSON line per text, its unit vector")
    embed.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.add_argument("--dimensions", type=int, help="keep the first N components, renormalised")
    connection.add_options(embed)
    embed.set_defaults(func=_embed)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    connection.add_options(p)


def _sampling(args: argparse.Namespace) -> SamplingOptions:
    return SamplingOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


async def _connect(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return await connection.connect(args.nats_url, args.data_dir, **CONNECT_OPTIONS)


def _run(args: argparse.Namespace, command: runner.Command) -> int:
    return _guard(
        lambda: runner.run(args, command, error_line=lambda exc, connected: f"error: {exc.message}", **CONNECT_OPTIONS)
    )


async def _answer(nc, request: InferenceRequest, out: TextIO) -> tuple[str, End]:  # type: ignore[no-untyped-def]
    """Stream one answer to ``out`` as it arrives; return its text and end marker."""
    pieces: list[str] = []
    async for message in inference_client.stream(nc, request):
        if isinstance(message, Chunk):
            pieces.append(message.text)
            out.write(message.text)
            out.flush()
        elif isinstance(message, End):
            return "".join(pieces), message
    raise inference_client.WorkerLost("the stream ended without an end marker")


def _complete(args: argparse.Namespace) -> int:
    return _run(args, _complete_on)


async def _complete_on(nc, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    try:
        request = InferenceRequest(model=args.ref, prompt=args.prompt, sampling=_sampling(args), stream=args.stream)
        if args.stream:
            await _answer(nc, request, sys.stdout)
        else:
            sys.stdout.write((await inference_client.complete(nc, request)).text)
        sys.stdout.write("\n")
        return 0
    finally:
        await inference_client.settle()  # a Ctrl-C'd stream's InferenceCancel goes out before the runner closes


def _embed(args: argparse.Namespace) -> int:
    return _run(args, _embed_on)


async def _embed_on(nc, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    request = embeddings.EmbeddingRequest(model=args.ref, inputs=args.texts, dimensions=args.dimensions)
    result = await embeddings.embed(nc, request)
    for index, vector in enumerate(result.vectors):
        print(json.dumps({"index": index, "embedding": embeddings.decode_vector(vector)}))
    reply = result.reply
    print(
        f"{reply.model.name}:{reply.model.version}, {reply.pooling} pooling, {reply.dimensions} dimensions, "
        f"{reply.prompt_tokens} tokens",
        file=sys.stderr,
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    """A synchronous read loop around one asyncio Runner: Ctrl-C while an answer streams cancels that
    answer (the worker gets an InferenceCancel) and the conversation goes on; at the prompt it leaves."""
    history: list[ChatMessage] = [ChatMessage(role="system", content=args.system)] if args.system else []
    try:
        _sampling(args)
    except ValidationError as exc:
        return _invalid(exc)
    with asyncio.Runner() as runner:
        try:
            nc = runner.run(_connect(args))
        except errors.StrataError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        try:
            print(
                f"chatting with {args.ref} ({EXIT_COMMANDS[0]} or Ctrl-D to leave, Ctrl-C stops an answer)",
                file=sys.stderr,
            )
            while True:
                try:
                    line = input("> ")
                except (EOFError, KeyboardInterrupt):
                    print(file=sys.stderr)
                    return 0
                if line.strip() in EXIT_COMMANDS:
                    return 0
                if not line.strip():
                    continue
                history.append(ChatMessage(role="user", content=line))
                request = InferenceRequest(model=args.ref, messages=history, sampling=_sampling(args), stream=True)
                try:
                    text, _end = runner.run(_answer(nc, request, sys.stdout))
                except KeyboardInterrupt:
                    history.pop()  # the question goes with its stopped answer
                    runner.run(inference_client.settle())  # let the InferenceCancel go out
                    print("\n[answer stopped]", file=sys.stderr)
                    continue
                except errors.StrataError as exc:
                    history.pop()
                    print(f"\nerror: {exc.message}", file=sys.stderr)
                    continue
                print()
                history.append(ChatMessage(role="assistant", content=text))
        finally:
            runner.run(nc.close())


def _guard(run) -> int:  # type: ignore[no-untyped-def]
    try:
        return run()
    except errors.StrataError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        return _invalid(exc)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: cannot reach NATS: {exc}", file=sys.stderr)
        return 1


def _invalid(exc: ValidationError) -> int:
    first = exc.errors()[0]
    print(f"error: invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", file=sys.stderr)
    return 2
