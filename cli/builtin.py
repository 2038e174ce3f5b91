"""Serve the built-in model out of the box: what `strata up` does once every service is healthy.

model-store registers the built-in checkpoint at its first start; here we wait until it resolves,
and unless a worker already serves it, we release any booking left from an earlier run (its worker
is gone) and deploy it through hardware-inventory, then wait until a worker serves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client

from builtin_model import MODEL_NAME
from cli import runner
from cli.inventory import undeploy
from shared import errors
from shared.contracts import hardware_inventory, model_store
from shared.inference_client import deployed_models

BUILTIN_REF = f"{MODEL_NAME}@prod"


async def serve_builtin(nc: Client, ref: str = BUILTIN_REF, timeout_s: float = 120.0) -> str:
    """Returns a line for the user: serving, or why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    resolved = None
    while resolved is None:
        try:
            resolved = await runner.call(nc, model_store.RESOLVE, ref=ref)
        except (errors.NotFound, errors.Unavailable) as exc:
            if loop.time() > deadline:
                return f"built-in model not deployed: {ref} is not in the model store ({exc.message})"
            await asyncio.sleep(0.5)
    name = resolved.model.name
    # This machine's agent registers its node a moment after the services report healthy.
    while not (await runner.call(nc, hardware_inventory.NODES)).nodes:
        if loop.time() > deadline:
            return "built-in model not deployed: no node registered with hardware-inventory"
        await asyncio.sleep(0.5)
    if await _served(nc, name):
        return f"built-in model {name} is already serving"
    try:  # a booking left from an earlier run: its worker is gone, so it would hold memory forever
        await undeploy(nc, model_ref=name, timeout=15)
    except errors.NotFound:
        pass
    outcome = await runner.call(nc, hardware_inventory.DEPLOY, model_ref=ref, timeout=30)
    if not outcome.scheduled:
        return f"built-in model not deployed: {outcome.reason}"
    while not await _served(nc, name):
        if loop.time() > deadline:
            return (
                f"built-in model {name} was scheduled but no worker serves it after {timeout_s:.0f}s; "
                "see the inference-worker's lines"
            )
        await asyncio.sleep(0.5)
    return f"built-in model {name} is serving"


async def _served(nc: Client, name: str) -> bool:
    return any(model.name == name for model in await deployed_models(nc))


async def serve_builtin_while_up(
    nc: Client, stopping: asyncio.Event, say: Callable[[str], None], try_it: Callable[[], str]
) -> None:
    """`strata up`'s built-in deploy: ``serve_builtin`` until it answers or `strata up` stops, its line
    for the user and, once serving, how to try it (``try_it``). The platform stays up whatever happens."""
    try:
        served = asyncio.create_task(serve_builtin(nc))
        stopped = asyncio.create_task(stopping.wait())
        await asyncio.wait({served, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if served.done():
            say(f"strata up: {served.result()}")
            if served.result().endswith("serving"):
                say(f"strata up: try  {try_it()}")
        else:
            served.cancel()
    except Exception as exc:  # the user learns why nothing is served
        say(f"strata up: could not deploy the built-in model: {type(exc).__name__}: {exc}")
