"""Live pieces many tests share: a service's HTTP app behind a real uvicorn (in a thread, or on the
test's own event loop), and the workers' own count of the requests they carry."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import nats.errors
import uvicorn
from fastapi import FastAPI


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, what: str = "the service", start_timeout_s: float = 30) -> Iterator[str]:
    """``app`` behind a real uvicorn in a thread with its own event loop (lifespan on: the service
    connects NATS there); yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


async def in_flight_by_node(nc: nats.aio.client.Client, workers: int, model: str | None = None,
                            window_s: float = 2.0) -> dict[str, int]:
    """Ask every worker (rpc.inference-worker.models, no queue group) how many requests it carries
    (of ``model``, or of every model); done when ``workers`` answered, or after ``window_s`` of silence."""
    from shared.inference import LoadedModels, LoadedModelsRequest
    from shared.inference_client import MODELS_SUBJECT
    from shared.rpc import RpcReply

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(MODELS_SUBJECT, LoadedModelsRequest().model_dump_json().encode(), reply=inbox)
    counts: dict[str, int] = {}
    try:
        while len(counts) < workers:
            msg = await sub.next_msg(timeout=window_s)
            loaded = LoadedModels.model_validate(RpcReply.model_validate_json(msg.data).result)
            counts[loaded.node_id] = sum(d.requests_in_flight for d in loaded.deployments
                                         if model is None or d.model.name == model)
    except nats.errors.TimeoutError:  # no more replies within the window
        pass
    finally:
        await sub.unsubscribe()
    return counts


@contextlib.asynccontextmanager
async def serve_on_loop(app: FastAPI, *, lifespan: str = "off", start_timeout_s: float = 30) -> AsyncIterator[str]:
    """``app`` behind a real uvicorn on this event loop (where the service's NATS connection lives);
    yields the base URL. ``lifespan="on"`` when uvicorn should run the service's start and stop."""
    sock = socket.socket()
    # uvicorn on a plain asyncio loop (not uvloop) otherwise answers each request ~40 ms late (Nagle
    # against the client's delayed ACK); accepted connections inherit the option from this socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = asyncio.get_running_loop().time() + start_timeout_s
        while not server.started:
            assert not task.done(), "uvicorn stopped at start"
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()
