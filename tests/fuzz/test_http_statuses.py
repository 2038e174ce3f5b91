"""Declared error statuses: shared/http_errors.py builds the OpenAPI ``responses`` of the typed errors,
and the status check that tests/fuzz/test_http_fuzz.py runs on every service really fails a route that
answers a status it does not declare (so that test cannot pass because the check is asleep)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from shared.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized, Unavailable
from shared.http_errors import AUTH_RESPONSES, HttpError, error_responses, typed_bad_requests
from shared.service import Service
from tests.fuzz.test_http_fuzz import Target, fuzz, serving
from tests.support.helpers import make_service, settings_for

pytestmark = pytest.mark.timeout(120)
KNOWN = "known"
DOCUMENTED = ("model-store", "hardware-inventory", "provenance-ledger", "monitor")


class Thing(BaseModel):
    name: str


def probe(nats_url: str, data_dir: Path, *, declared: bool) -> Service:
    """A service with one route that answers 404 for every name but one, declared or not."""
    service = Service("status-probe", settings_for("status-probe", nats_url, data_dir))
    typed_bad_requests(service.http)

    @service.http.get("/things/{name}", response_model=Thing, responses=error_responses(NotFound) if declared else None)
    async def thing(name: str) -> Thing:
        if name != KNOWN:
            raise NotFound(f"no thing {name!r}")
        return Thing(name=name)

    @service.http.post("/things", response_model=Thing, responses=error_responses(Invalid))
    async def add(body: Thing) -> Thing:
        return body

    return service


# -- error_responses -------------------------------------------------------------------------------
def test_error_responses_map_each_error_to_its_status_with_the_typed_body():
    responses = error_responses(Invalid, NotFound, Conflict, Unavailable)
    assert sorted(responses) == [400, 404, 409, 503]
    assert all(r["model"] is HttpError and r["description"] for r in responses.values())
    assert error_responses() == {}


def test_auth_adds_401_403_and_503_and_merges_with_the_routes_own():
    assert sorted(AUTH_RESPONSES) == [401, 403, 503]
    merged = error_responses((Forbidden, "the policy refuses it"), Unavailable, auth=True)
    assert sorted(merged) == [401, 403, 503]
    assert merged[401] == AUTH_RESPONSES[401]
    assert merged[403]["description"] == f"{AUTH_RESPONSES[403]['description']}; the policy refuses it"
    assert merged[503]["description"].startswith(AUTH_RESPONSES[503]["description"] + "; ")
    assert error_responses(Unauthorized, Unauthorized) == error_responses(Unauthorized)  # a repeat adds nothing


def test_an_error_class_with_its_own_docstring_is_described_by_its_first_line():
    class Gone(NotFound):
        """The thing was deleted.

        More words that the description leaves out."""

    assert error_responses(Gone)[404]["description"] == "The thing was deleted."


# -- the status check bites ------------------------------------------------------------------------
@pytest.mark.parametrize("declared", [False, True], ids=["undeclared-404", "declared-404"])
async def test_the_fuzz_status_check_fails_an_undeclared_typed_error_only(declared: bool, nats_server, tmp_path: Path):
    async with serving(probe(nats_server.url, tmp_path, declared=declared)) as url:
        failures = await asyncio.to_thread(fuzz, Target("status-probe"), url)
    if declared:
        assert failures == []
    else:
        assert failures, "an undeclared 404 went through the status check"
        assert all(f.startswith("GET /things/{name}") and "Received: 404" in f for f in failures), failures


async def test_a_body_fastapi_cannot_read_answers_the_typed_400_and_other_http_errors_keep_theirs(
    nats_server, tmp_path: Path
):
    async with (
        serving(probe(nats_server.url, tmp_path, declared=True)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        unreadable = await client.post("/things", content=b"\xff\xfe{", headers={"content-type": "application/json"})
        assert unreadable.status_code == 400
        assert unreadable.json() == {"error": {"code": "invalid", "message": "There was an error parsing the body"}}
        unknown = await client.get("/no-such-route")
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})
        wrong_shape = await client.post("/things", json={"nom": "x"})
        assert (
            wrong_shape.status_code == 422
        )  # a body that breaks the schema: FastAPI's validation answer, declared by it


# -- what the services document ----------------------------------------------------------------------
@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_error_status_a_service_documents_has_a_description_and_the_typed_body(
    name: str, nats_server, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")
    schema = make_service(name, nats_server.url, tmp_path).http.openapi()
    error_statuses = 0
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "default" not in operation["responses"], f"{method.upper()} {path}"
            for status, response in operation["responses"].items():
                if status.startswith("2") or status == "422" or path == "/healthz":
                    continue
                error_statuses += 1
                assert response["description"], f"{method.upper()} {path} {status}"
                body = response["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/HttpError"}, f"{method.upper()} {path} {status}: {body}"
    assert error_statuses > 0 or name == "monitor", f"{name} documents no error status"  # monitor's routes raise none
