"""A non-stream request with ``keepalive: true`` against the real worker and engine: keepalives while
it waits behind another request, then exactly one ``RpcReply``; none without the flag; and none at
admission, so a quick request on an idle engine is still a single message (shared/inference.py)."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.inference_worker.service_layer.worker import Worker
from services.inference_worker.service_layer.deployments import EngineOptions
from shared import subjects
from shared.inference import InferenceReply, InferenceRequest, Keepalive
from shared.inference_client import cancel, is_keepalive
from shared.rpc import RpcReply
from tests.inference_worker.conftest import make_worker, model_id
from tests.inference_worker.test_process import deploy, long_ckpt  # noqa: F401  (long_ckpt: a fixture)
from tests.support.helpers import eventually, flushed


class Replies:
    """Every message the worker sends to one request's reply inbox, in order."""

    def __init__(self, request: InferenceRequest) -> None:
        self.request, self.bodies = request, []

    async def send(self, nc: Client) -> Replies:
        async def collect(msg: Msg) -> None:
            self.bodies.append(msg.data)

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=collect)
        await nc.publish(
            subjects.inference_request(self.request.model), self.request.model_dump_json().encode(), reply=inbox
        )
        await flushed(nc)
        return self

    def keepalives(self) -> list[Keepalive]:
        return [Keepalive.model_validate_json(body) for body in self.bodies if is_keepalive(body)]

    def answered(self) -> bool:
        return bool(self.bodies) and not is_keepalive(self.bodies[-1])

    async def settled(self, nc: Client) -> None:
        """Wait for the reply, then a little longer: nothing may follow it."""
        await eventually(self.answered, 60, f"the reply to {self.request.prompt!r}")
        await flushed(nc)
        await asyncio.sleep(0.3)

    def reply(self) -> InferenceReply:
        """The one RpcReply, last of all messages, as a valid InferenceReply for this request."""
        rpc = RpcReply.model_validate_json(self.bodies[-1])
        assert rpc.ok, rpc.error
        reply = InferenceReply.model_validate(rpc.result)
        assert reply.request_id == self.request.request_id
        return reply


def short(prompt: str, keepalive: bool) -> InferenceRequest:
    return InferenceRequest(
        model="long", prompt=prompt, keepalive=keepalive, sampling={"max_tokens": 2, "temperature": 0}
    )


@pytest.fixture
async def one_seat(nats_server, tmp_path, long_ckpt, bus_client):  # noqa: F811
    """A worker serving 'long' one sequence at a time, deployed."""
    worker = make_worker(nats_server.url, tmp_path / "w", {"long": long_ckpt}, engine=EngineOptions(max_num_seqs=1))
    async with worker.running():
        await deploy(bus_client, model_id("long"), "dep-long", "node-a", context=4096)
        yield worker


async def test_a_queued_non_stream_request_gets_keepalives_then_one_reply_only_when_it_asks(one_seat, bus_client):
    worker = one_seat
    nc = bus_client.nc
    occupying = InferenceRequest(model="long", prompt="It was", sampling={"max_tokens": 4000, "temperature": 0})
    first = asyncio.ensure_future(
        nc.request(subjects.inference_request("long"), occupying.model_dump_json().encode(), timeout=60)
    )
    loop = worker.part(Worker).deployments.by_key["dep-long/0"].loop
    await eventually(lambda: loop.stats.tokens > 0, 10, "the long request generating")
    # the plain one queues first, so it has waited at least as long as the other when that one's keepalive comes
    plain = await Replies(short("Call me", keepalive=False)).send(nc)
    asked = await Replies(short("Call me too", keepalive=True)).send(nc)
    await eventually(asked.keepalives, 30, "a keepalive while queued behind the long request")
    await cancel(nc, occupying.request_id)  # enough waiting: let the queued ones run
    await asked.settled(nc)
    await plain.settled(nc)

    assert len(asked.bodies) >= 2 and all(is_keepalive(b) for b in asked.bodies[:-1])
    assert {k.request_id for k in asked.keepalives()} == {asked.request.request_id}
    assert asked.reply().usage.completion_tokens == 2

    assert len(plain.bodies) == 1 and not plain.keepalives()  # asked for none: one message, the reply
    assert plain.reply().usage.completion_tokens == 2
    assert RpcReply.model_validate_json((await first).data).ok


async def test_a_quick_keepalive_request_on_an_idle_engine_gets_only_its_reply(one_seat, bus_client):
    nc = bus_client.nc
    warm_up = await Replies(short("Hello", keepalive=False)).send(nc)  # a first request may pay one-off costs
    await warm_up.settled(nc)
    quick = await Replies(short("Hello again", keepalive=True)).send(nc)
    await quick.settled(nc)
    assert len(quick.bodies) == 1 and not quick.keepalives()  # no keepalive at admission
    assert quick.reply().text
