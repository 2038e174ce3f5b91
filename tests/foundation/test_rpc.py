"""Typed request-reply between services, over a real nats-server and real HTTP error mapping."""

import httpx
import nats
import pytest
from pydantic import BaseModel

from shared import errors, rpc, subjects
from shared.service import Service
from tests.support.helpers import settings_for


class Lookup(BaseModel):
    name: str


class Found(BaseModel):
    name: str
    size: int


def lookup_service(nats_url, tmp_path) -> Service:
    service = Service("model-store", settings_for("model-store", nats_url, tmp_path))

    @service.rpc("lookup", Lookup)
    async def lookup(request: Lookup) -> Found:
        if request.name == "missing":
            raise errors.NotFound(f"no model named {request.name!r}")
        if request.name == "bug":
            raise ZeroDivisionError("division by zero")
        return Found(name=request.name, size=len(request.name))

    @service.http.get("/lookup/{name}")
    async def lookup_http(name: str) -> Found:
        return await lookup(Lookup(name=name))

    return service


async def test_rpc_returns_the_typed_result_and_the_typed_errors(nats_server, tmp_path):
    service = lookup_service(nats_server.url, tmp_path)
    subject = subjects.rpc("model-store", "lookup")
    async with service.running():
        nc = await nats.connect(nats_server.url)
        try:
            assert await rpc.call(nc, subject, Lookup(name="tiny"), Found) == Found(name="tiny", size=4)
            with pytest.raises(errors.NotFound, match="no model named 'missing'"):
                await rpc.call(nc, subject, Lookup(name="missing"), Found)
            with pytest.raises(errors.StrataError, match="internal error: ZeroDivisionError"):
                await rpc.call(nc, subject, Lookup(name="bug"), Found)
            reply = rpc.RpcReply.model_validate_json((await nc.request(subject, b'{"nom": 1}', timeout=5)).data)
            assert not reply.ok and reply.error.code == "invalid" and "name" in reply.error.message
            deep = rpc.RpcReply.model_validate_json((await nc.request(subject, b"[" * 50_000, timeout=5)).data)
            assert not deep.ok and deep.error.code == "invalid", (
                deep
            )  # not a RecursionError in the decoder, and no silence
            health = await nc.request(subjects.rpc("model-store", "health"), b"[" * 50_000, timeout=5)
            assert b'"service":"model-store"' in health.data.replace(b" ", b"")
            with pytest.raises(errors.Unavailable, match="no service answers rpc.model-store.nothing"):
                await rpc.call(nc, subjects.rpc("model-store", "nothing"), Lookup(name="x"), Found, timeout=1)
        finally:
            await nc.close()


async def test_http_answers_typed_errors_with_their_status_and_reason(nats_server, tmp_path):
    service = lookup_service(nats_server.url, tmp_path)
    async with service.running():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://svc") as client:
            missing = await client.get("/lookup/missing")
            ok = await client.get("/lookup/tiny")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "no model named 'missing'"}}
    assert ok.json() == {"name": "tiny", "size": 4}
