"""Every HTTP API, fuzzed from its own OpenAPI schema by schemathesis: each service runs under a real
uvicorn on a free port against a real nats-server, the schema is loaded from the live
``/openapi.json``, and every operation gets a bounded number of valid (positive) and invalid
(negative) requests from hypothesis. No response may be a 5xx, except the few that a route declares in
its OpenAPI ``responses`` as a deliberate answer (listed below, each with why); every response whose
status the schema documents must match the documented body; and every status a route answers must be
one its OpenAPI documents (``status_code_conformance``: the typed errors of shared/errors.py, declared
with shared/http_errors.py's ``error_responses``, or OpenAI's for the gateway), with no ``default``
response that would let any status through. tests/fuzz/test_http_statuses.py shows the check bites.

uvicorn serves on the test's event loop (where the service's NATS connection lives) while schemathesis,
which is synchronous, runs in a worker thread. Generation is derandomized, so a CI run is reproducible.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from shared.service import Service
from tests.hardware_inventory.conftest import model_store
from tests.support.fake_worker import FakeWorker, Script
from tests.support.helpers import make_service
from tests.support.live import serve_on_loop

pytestmark = pytest.mark.timeout(240)
# per operation and generation mode: 12 keeps the whole file well under a minute; a deeper run sets more
EXAMPLES = int(os.environ.get("STRATA_FUZZ_EXAMPLES", "12"))
REQUEST_TIMEOUT_S = 30.0
Peers = Callable[[str, Path, AsyncExitStack], Any]


@dataclass
class Target:
    service: str
    # "METHOD /path" -> 5xx statuses that route declares as a deliberate answer (and why, in a comment)
    deliberate: dict[str, frozenset[int]] = field(default_factory=dict)
    # a parameter or body field name -> values the service knows, planted in half the valid requests so
    # that they reach past "not found" (a random string never names a deployed model)
    known: dict[str, list[Any]] = field(default_factory=dict)
    peers: Peers | None = None
    prepare: Callable[[pytest.MonkeyPatch], None] | None = None  # before the service is built


async def _inventory_peers(nats_url: str, tmp: Path, stack: AsyncExitStack) -> None:
    """A scripted model-store answers the registry's resolve RPC, so /fit and /deployments get past it."""
    await stack.enter_async_context(model_store(nats_url, tmp / "scripted-model-store").running())


async def _gateway_peers(nats_url: str, _tmp: Path, stack: AsyncExitStack) -> None:
    """A scripted worker serves model 'tiny', so a request naming it is answered end to end."""
    worker = await FakeWorker(nats_url, {"tiny": Script()}).start()
    stack.push_async_callback(worker.stop)


def _short_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """/api/stream lasts max_s (20 s by default and at most, and an invalid request that the server
    ignores, such as one with unknown parameters, gets the default): the test shortens the monitor's cap."""
    monkeypatch.setenv("STRATA_MONITOR_STREAM_MAX_S", "0.3")
    monkeypatch.setenv("STRATA_MONITOR_PUSH_EVERY_S", "0.1")


_OPENAI = frozenset({
    502,  # "the worker died": a worker fell silent mid-request
    503,  # "workers overloaded (Retry-After)"
    504,  # "timed out": no worker answered in time
})
TARGETS = [
    Target("api-gateway", deliberate={"POST /v1/chat/completions": _OPENAI, "POST /v1/completions": _OPENAI,
                                      "GET /v1/models": _OPENAI}, known={"model": ["tiny"]}, peers=_gateway_peers),
    Target("model-store"),
    Target("hardware-inventory", known={"model_ref": ["tiny", "small", "llama3-8b"]}, peers=_inventory_peers),
    Target("provenance-ledger"),
    Target("monitor", prepare=_short_streams),
    Target("inference-worker"),
]


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[str]:
    """``service`` under a real uvicorn on a free port, on this event loop; yields its base URL."""
    async with service.running(), serve_on_loop(service.http) as url:
        yield url


def _undeclared_server_error(target: Target) -> Callable[..., Any]:
    def not_a_server_error_unless_deliberate(ctx, response, case):
        # Only a status this route both lists here and declares in its OpenAPI responses is let through.
        allowed = target.deliberate.get(case.operation.label, frozenset())
        if response.status_code in allowed and str(response.status_code) in case.operation.responses.status_codes:
            return None
        return not_a_server_error(ctx, response, case)

    return not_a_server_error_unless_deliberate


def seeded(
    strategy: SearchStrategy[schemathesis.Case], known: dict[str, list[Any]]
) -> SearchStrategy[schemathesis.Case]:
    """Valid cases, half of them with the ``known`` values planted where a parameter or field of that name is."""
    if not known:
        return strategy

    def plant(drawn: tuple[schemathesis.Case, bool, int]) -> schemathesis.Case:
        case, wanted, pick = drawn
        containers = [case.path_parameters, case.query, case.body if isinstance(case.body, dict) else None]
        for container in (c for c in containers if wanted and c):
            for name, values in known.items():
                if name in container:
                    container[name] = values[pick % len(values)]
        return case

    return st.tuples(strategy, st.booleans(), st.integers(min_value=0, max_value=99)).map(plant)


def modes(operation: schemathesis.APIOperation) -> list[GenerationMode]:
    """Valid requests always; invalid ones where the operation takes any input to make invalid."""
    takes_input = any(True for _ in operation.iter_parameters()) or len(operation.body) > 0
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if takes_input else [GenerationMode.POSITIVE]


def fuzz(target: Target, base_url: str) -> list[str]:
    """Run every operation of the live schema; return one report per failing operation and mode."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    checks = [_undeclared_server_error(target), response_schema_conformance, status_code_conformance]
    failures: list[str] = []
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{target.service} documents no operation"
    for operation in operations:
        if "default" in operation.responses.status_codes:  # status_code_conformance lets every status through
            failures.append(f"{operation.label}: declares a 'default' response instead of its statuses")
        for mode in modes(operation):
            strategy = operation.as_strategy(generation_mode=mode)
            if mode.is_positive:
                strategy = seeded(strategy, target.known)

            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                print_blob=False,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.filter_too_much,
                    HealthCheck.data_too_large,
                    HealthCheck.large_base_example,
                ],
            )
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
                case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:
                # schemathesis found no way to make this operation's inputs invalid (e.g. only free-form
                # strings): there is no negative case to send, which is not a finding
                if mode.is_positive:
                    failures.append(f"{operation.label}: no valid request could be generated")
            except (Exception, FailureGroup) as exc:  # noqa: BLE001  (every operation runs; the test fails on all of them at once)
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {exc}")
    session.close()
    return failures


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.service)
async def test_no_operation_answers_with_an_undeclared_server_error(
    target: Target, nats_server, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")  # the built-in model's upload is not what is tested here
    async with AsyncExitStack() as stack:
        if target.prepare is not None:
            target.prepare(monkeypatch)
        if target.peers is not None:
            await target.peers(nats_server.url, tmp_path, stack)
        service = make_service(target.service, nats_server.url, tmp_path / target.service)
        base_url = await stack.enter_async_context(serving(service))
        failures = await asyncio.to_thread(fuzz, target, base_url)
    assert not failures, "\n\n".join(failures)
