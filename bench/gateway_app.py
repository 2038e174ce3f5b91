"""CPU of one ``POST /v1/chat/completions`` inside the api-gateway's ASGI app, in-process: no HTTP
server, no NATS (the worker's answer is stubbed), so what is left is the framework and our route code.

Baseline, same run: a bare ASGI callable that does the same work by hand (read the body, validate it
as ``ChatCompletionRequest``, build the ``InferenceRequest``, get the stubbed answer, render the OpenAI
body) with no routing, middleware, telemetry or auth. The gap is what FastAPI and our middleware
cost per request; bench/platform_overhead.py measures the whole path.

    .venv/bin/python bench/gateway_app.py                 # ~20 s
    .venv/bin/python bench/gateway_app.py --profile       # cProfile of the gateway app, top 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.api_gateway.api import Caller, ChatCompletionRequest, Gateway, chat_completion, create_service  # noqa: E402
from shared.events import ModelId, new_id  # noqa: E402
from shared.inference import InferenceReply, InferenceRequest, Usage  # noqa: E402

BODY = json.dumps(
    {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
).encode()
HEADERS = [
    (b"host", b"bench"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"authorization", b"Bearer sk-strata-bench"),
]
MODEL = ModelId(name="echo", version=1, digest="sha256:" + "ab" * 32)


async def answer(request: InferenceRequest) -> InferenceReply:
    return InferenceReply(
        request_id=request.request_id,
        model=MODEL,
        text="hi",
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
    )


def gateway_app():
    service = create_service()
    gateway = service.part(Gateway)

    async def anyone(_key: str | None) -> Caller:  # the key store lives in NATS: not here
        return Caller(key=None)

    gateway.authenticate, gateway.complete = anyone, answer
    return service.http


async def bare_app(scope, receive, send) -> None:
    body = (await receive())["body"]
    chat = ChatCompletionRequest.model_validate_json(body)
    reply = await answer(chat.to_inference(new_id()))
    out = chat_completion(reply, chat.model).model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


async def one(app) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": HEADERS,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)  # no disconnect during a request
        return {"type": "http.disconnect"}

    status = []

    async def send(message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"the app answered {status}")


async def cpu_ms(app, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await one(app)
    return (time.process_time() - start) / n * 1e3


async def main_async(args) -> None:
    apps = {"gateway app": gateway_app(), "bare ASGI, same work": bare_app}
    for app in apps.values():
        await cpu_ms(app, 300)  # warm-up
    best = {name: min([await cpu_ms(app, args.requests) for _ in range(args.repeat)]) for name, app in apps.items()}
    for name, ms in best.items():
        print(f"{name:<22} {ms:.3f} ms CPU per request (best of {args.repeat} x {args.requests})")
    print(
        f"framework and middleware: +{best['gateway app'] - best['bare ASGI, same work']:.3f} ms "
        f"({best['gateway app'] / best['bare ASGI, same work']:.2f}x the bare work)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the gateway app instead (top 30 by own time)")
    args = ap.parse_args()
    if args.profile:
        import cProfile
        import pstats

        app = gateway_app()
        with cProfile.Profile() as profile:
            asyncio.run(cpu_ms(app, args.requests))
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        return
    try:
        import uvloop  # as uvicorn runs the service
    except ImportError:
        asyncio.run(main_async(args))
    else:
        uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
