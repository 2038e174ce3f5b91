"""Live pieces many tests share: a service's HTTP app behind a real uvicorn, and the workers' own
count of the requests they carry."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

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
