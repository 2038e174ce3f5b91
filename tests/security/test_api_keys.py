"""HTTP API keys across Strata (shared/apikeys.py, apikey_store.py, apikey_http.py): 401 for a
missing, wrong or revoked key, 403 for a key without the scope, 429 with Retry-After for a key over
its request or token quota (tokens reserved at admission and settled with a real worker's usage; the
rules themselves: tests/api_gateway/test_quota_rules.py),
open mode, and `strata key create|ls|revoke` against plain and auth-enabled nats-servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import stat
import time

import httpx
import nats
import openai
import pytest

from cli.main import main as strata
from shared.apikey_store import RECHECK_S, KeyStore, ensure_admin_key
from shared.apikeys import ApiKeyRecord, bearer_token, hash_key, key_id, record_for
from shared import subjects
from shared.events import InferenceCompleted
from shared.service import Service
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401
from tests.support.fake_worker import FakeWorker, Script
from tests.support.helpers import make_service
from tests.support.live import serve_in_thread

pytestmark = pytest.mark.timeout(120)
HI = [{"role": "user", "content": "hi"}]


# -- the domain, no NATS ----------------------------------------------------------------------
def test_a_record_keeps_only_the_hash_and_a_short_public_id():
    key = "sk-strata-" + "x" * 43
    record = record_for(key, "ci", ["admin"], requests_per_minute=5)
    assert record.id == hash_key(key)[:12] == key_id(key) and key not in record.model_dump_json()
    assert record.matches(key) and not record.matches(key + "y")
    assert record.grants("admin") and record.grants("inference"), "admin implies inference"
    inference = record_for(key, "app")
    assert inference.grants("inference") and not inference.grants("admin")
    legacy = ApiKeyRecord.model_validate({"key_hash": "a" * 64, "name": "old", "created": "2024-01-01T00:00:00Z"})
    assert legacy.scopes == ["inference"] and legacy.requests_per_minute is None, (
        "a pre-scope record stays a gateway key"
    )
    assert [bearer_token(h) for h in ("Bearer k", "bearer  k ", "Basic k", "Bearer", None)] == [
        "k",
        "k",
        None,
        None,
        None,
    ]


# -- live services --------------------------------------------------------------------------
def serve(service: Service) -> contextlib.AbstractContextManager[str]:
    return serve_in_thread(service.http, service.name)


@contextlib.asynccontextmanager
async def key_store(nats_url: str):
    nc = await nats.connect(nats_url)
    try:
        yield await KeyStore.open(nc.jetstream(), create=True)
    finally:
        await nc.close()


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def test_admin_routes_need_an_admin_key_and_reads_stay_open(nats_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")
    monkeypatch.setenv("STRATA_INVENTORY_ROLES", "registry")
    blob = b"some bytes"
    sha = hashlib.sha256(blob).hexdigest()
    with contextlib.ExitStack() as stack:
        store_url, inventory_url, ledger_url = (
            stack.enter_context(serve(make_service(name, nats_server.url, tmp_path / name)))
            for name in ("model-store", "hardware-inventory", "provenance-ledger")
        )
        async with httpx.AsyncClient(timeout=30) as http:
            # open mode: no key exists yet, so every route answers, and every service says so
            for url in (store_url, inventory_url, ledger_url):
                assert (await http.get(f"{url}/healthz")).json()["auth"] == "open"
            assert (await http.post(f"{ledger_url}/checkpoint")).status_code == 200
            warned = {r.name for r in caplog.records if "NO API KEY IS CONFIGURED" in r.getMessage()}
            assert warned == {"model-store", "hardware-inventory", "provenance-ledger"}

            async with key_store(nats_server.url) as keys:
                admin, _ = await keys.create("ops", ["admin"])
                inference, _ = await keys.create("app", ["inference"])
                revoked, _ = await keys.create("old", ["admin"])
                await keys.revoke(key_id(revoked))
            for url in (store_url, inventory_url, ledger_url):  # readers find the new bucket by themselves

                async def closed(u: str = url) -> bool:
                    return (await http.get(f"{u}/healthz")).json()["auth"] == "api-keys"

                await _until(closed, f"{url} to see the keys")

            routes = [
                ("PUT", f"{store_url}/v1/blobs/{sha}", {"content": blob}),
                ("POST", f"{inventory_url}/deployments", {"json": {"model_ref": "absent:1"}}),
                ("POST", f"{ledger_url}/checkpoint", {}),
            ]
            for method, url, body in routes:
                for key, status, words in (
                    (None, 401, "missing API key"),
                    ("sk-strata-wrong", 401, "incorrect API key"),
                    (revoked, 401, "revoked"),
                    (inference, 403, "needs 'admin'"),
                ):
                    answer = await http.request(method, url, headers=bearer(key), **body)
                    assert answer.status_code == status and words in answer.json()["error"]["message"], (
                        url,
                        key,
                        answer.text,
                    )
            assert (
                await http.put(f"{store_url}/v1/blobs/{sha}", content=blob, headers=bearer(admin))
            ).status_code == 200
            assert (await http.post(f"{ledger_url}/checkpoint", headers=bearer(admin))).status_code == 200
            deploy = await http.post(
                f"{inventory_url}/deployments", json={"model_ref": "absent:1"}, headers=bearer(admin)
            )
            assert deploy.status_code not in (401, 403), deploy.text  # past auth, the registry answers on the model
            undeploy = await http.delete(
                f"{inventory_url}/deployments", params={"model_ref": "absent:1"}, headers=bearer(inference)
            )
            assert undeploy.status_code == 403
            for url in (
                f"{store_url}/v1/models",
                f"{inventory_url}/deployments",
                f"{ledger_url}/head",
                f"{store_url}/healthz",
            ):
                assert (await http.get(url)).status_code == 200, url  # reads and health stay open

            spec = (await http.get(f"{store_url}/openapi.json")).json()
            assert {"401", "403"} <= set(spec["paths"]["/v1/models"]["post"]["responses"])
            assert "401" not in spec["paths"]["/v1/models"]["get"]["responses"]
            assert "(the ledger's records need `read`); /healthz and /metrics are open" in spec["info"]["description"]

        # the CLI sends the key: --api-key, or $STRATA_API_KEY
        data = tmp_path / "corpus.txt"
        data.write_text("in the beginning")
        add = ["dataset", "add", str(data), "--url", store_url]
        assert await asyncio.to_thread(strata, [*add, "--api-key", inference]) == 1
        monkeypatch.setenv("STRATA_API_KEY", admin)
        assert await asyncio.to_thread(strata, add) == 0


async def _until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_gateway_keys_scopes_and_request_quota(nats_server, tmp_path):
    worker = await FakeWorker(nats_server.url, {"tiny": Script()}).start()
    try:
        async with key_store(nats_server.url) as keys:
            limited, record = await keys.create("limited", ["inference"], requests_per_minute=2)
            admin, _ = await keys.create("ops", ["admin"])
        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            client = gateway.client(api_key=limited)
            for _ in range(2):
                chat = await client.chat.completions.create(model="tiny", messages=HI)
                assert chat.choices[0].message.content == "Hello, world!"
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="tiny", messages=HI)
            retry_after = int(caught.value.response.headers["retry-after"])
            assert 1 <= retry_after <= 30
            error = caught.value.response.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
            assert "requests_per_minute quota of 2" in error["message"] and record.id in error["message"]
            admin_chat = await gateway.client(api_key=admin).chat.completions.create(model="tiny", messages=HI)
            assert admin_chat.choices[0].message.content == "Hello, world!", "admin implies inference"
            assert [r.api_key_id for r in worker.requests] == [record.id, record.id, key_id(admin)]
    finally:
        await worker.stop()


async def test_token_quota_is_charged_a_real_workers_usage(nats_server, tmp_path, ckpts):  # noqa: F811
    """A real worker serves the request and publishes inference.completed with the key's id and the
    caller's x-request-id; the gateway settles the request's reservation with its real usage (more
    than the key's 6 tokens a minute: it ran alone on a full bucket), and the next request gets 429."""
    bus = await connect_bus(nats_server.url, "node-a")
    async with make_worker(nats_server.url, tmp_path / "worker", ckpts).running():
        await deployed(bus, "tiny")
        async with key_store(nats_server.url) as keys:
            key, record = await keys.create("metered", tokens_per_minute=6)
        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            client = gateway.client(api_key=key)
            first = await client.completions.create(
                model="tiny",
                prompt="Once upon a time",
                max_tokens=4,
                temperature=0,
                extra_headers={"x-request-id": "mine-1"},
            )
            used = first.usage.prompt_tokens + first.usage.completion_tokens
            assert used > 6
            done = await bus.wait(InferenceCompleted, api_key_id=record.id, timeout=30)  # the worker copied the ids
            assert done.api_key_id == record.id and done.prompt_tokens + done.completion_tokens == used
            assert done.client_request_id == "mine-1" and first.id == f"cmpl-{done.request_id}"

            async def refused() -> openai.RateLimitError | None:
                try:
                    await client.completions.create(model="tiny", prompt="again", max_tokens=1)
                except openai.RateLimitError as exc:
                    return exc
                return None

            refusal = None
            deadline = time.monotonic() + 20
            while refusal is None and time.monotonic() < deadline:  # the charge lands when the event does
                refusal = await refused()
            assert refusal is not None, "the token quota never refused"
            error = refusal.response.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and "tokens_per_minute quota of 6" in error["message"]
            assert 1 <= int(refusal.response.headers["retry-after"]) <= 600
    await bus.nc.close()


async def test_only_the_gateway_says_which_key_asked(nats_server, tmp_path, ckpts):  # noqa: F811
    """api_key_id and client_request_id are the gateway's to set: a NATS program that claims them on a
    model's own subjects (to charge another key's quota, or be logged as it) is refused with the reason,
    for an answer, an embedding and a batch job alike; nothing is run and no inference.completed names the
    key. Only the gateway may publish on the attributed subjects (tests/security/test_nats_auth.py)."""
    from shared.embeddings import EmbeddingRequest
    from shared.inference import InferenceRequest
    from shared.inference_client import complete
    from shared.inference_jobs import job_result, submit_job
    from shared.rpc import RpcReply

    bus = await connect_bus(nats_server.url, "node-a")
    async with make_worker(nats_server.url, tmp_path / "worker", ckpts).running():
        await deployed(bus, "tiny")
        claims = {"api_key_id": "victim-key", "client_request_id": "theirs"}
        for field, value in claims.items():
            for subject, body in (
                (subjects.inference_request("tiny"), InferenceRequest(model="tiny", prompt="hi", **{field: value})),
                (subjects.embedding_request("tiny"), EmbeddingRequest(model="tiny", inputs=["hi"], **{field: value})),
            ):
                msg = await bus.nc.request(subject, body.model_dump_json().encode(), timeout=30)
                reply = RpcReply.model_validate_json(msg.data)
                assert not reply.ok and reply.error.code == "forbidden", (subject, msg.data)
                assert f"{field} is set by the api-gateway only" in reply.error.message
        job = InferenceRequest(model="tiny", prompt="hi", api_key_id="victim-key")
        await submit_job(bus.nc.jetstream(), job)
        result = None
        for _ in range(100):
            if (result := await job_result(bus.nc.jetstream(), job.request_id)) is not None:
                break
            await asyncio.sleep(0.2)
        assert result is not None and not result.ok and result.error.code == "forbidden"
        plain = InferenceRequest(model="tiny", prompt="hi", sampling={"max_tokens": 2})  # claims nothing: served
        assert (await complete(bus.nc, plain)).usage.completion_tokens == 2
        await bus.wait(InferenceCompleted, request_id=plain.request_id)  # the worker's events arrive in order
        assert (
            bus.of(InferenceCompleted, api_key_id="victim-key") == []
            and bus.of(InferenceCompleted, client_request_id="theirs") == []
        )
    await bus.nc.close()


async def test_ensure_admin_key_only_on_an_empty_bucket(nats_server, tmp_path):
    async with key_store(nats_server.url) as keys:
        path = tmp_path / "secrets" / "admin.key"
        key = await ensure_admin_key(keys, path)
        assert key is not None and path.read_text().strip() == key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        record = await keys.lookup(key)
        assert record is not None and record.name == "bootstrap-admin" and record.scopes == ["admin"]
        assert await ensure_admin_key(keys, tmp_path / "again.key") is None
        assert not (tmp_path / "again.key").exists()


async def test_a_key_read_is_believed_for_a_second_so_requests_cost_no_kv_round_trip(nats_server, monkeypatch):
    async with key_store(nats_server.url) as keys:
        key, _ = await keys.create("cached")
        reads = []
        get = keys.get
        monkeypatch.setattr(keys, "get", lambda id: reads.append(id) or get(id))
        for _ in range(20):
            assert (await keys.lookup(key)).name == "cached"
            assert await keys.lookup("sk-strata-made-up") is None
        assert len(reads) == 2, "one read per id, not one per request"
        await keys.revoke(key_id(key))  # this store forgets what it read of the key at once
        assert (await keys.lookup(key)).revoked


# -- the CLI --------------------------------------------------------------------------------
async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(strata, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def refused_within(client: openai.AsyncOpenAI, seconds: float) -> openai.AuthenticationError:
    """Ask until the gateway refuses the client's key; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await client.chat.completions.create(model="tiny", messages=HI)
        except openai.AuthenticationError as refused:
            return refused
        assert asyncio.get_running_loop().time() < deadline, f"the revoked key still worked after {seconds}s"
        await asyncio.sleep(0.1)


async def test_cli_create_ls_revoke_round_trip(nats_server, tmp_path, capsys):
    worker = await FakeWorker(nats_server.url, {"tiny": Script()}).start()
    common = ["--nats-url", nats_server.url, "--data-dir", str(tmp_path / "no-auth-here")]
    try:
        code, out, _ = await cli(capsys, "key", "ls", *common)
        assert code == 0 and "no API keys" in out
        code, out, err = await cli(capsys, "key", "create", "--name", "ci", "--rpm", "100", "--tpm", "5000", *common)
        key = out.strip()
        assert code == 0 and key.startswith("sk-strata-") and "only time the key is shown" in err
        code, out, _ = await cli(capsys, "key", "create", "--name", "ops", "--scope", "admin", "--json", *common)
        made = json.loads(out)
        assert (
            made["scopes"] == ["admin"] and made["requests_per_minute"] is None and made["key"].startswith("sk-strata-")
        )
        code, out, _ = await cli(capsys, "key", "ls", "--json", *common)
        listed = {r["name"]: r for r in json.loads(out)}
        assert set(listed) == {"ci", "ops"} and listed["ci"]["id"] == key_id(key)
        assert listed["ci"]["requests_per_minute"] == 100 and listed["ci"]["tokens_per_minute"] == 5000
        assert key not in out and hash_key(key) not in out, "ls never shows a key (nor its full hash)"
        code, out, _ = await cli(capsys, "key", "ls", *common)
        assert code == 0 and key_id(key) in out and "5000" in out

        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            chat = await gateway.client(api_key=key).chat.completions.create(model="tiny", messages=HI)
            assert chat.choices[0].message.content == "Hello, world!"
            code, out, _ = await cli(capsys, "key", "revoke", key_id(key), *common)
            assert code == 0 and f"revoked API key {key_id(key)}" in out
            refused = await refused_within(gateway.client(api_key=key), RECHECK_S + 2)  # a read is believed RECHECK_S
            assert "revoked" in refused.response.json()["error"]["message"]
        code, out, _ = await cli(capsys, "key", "ls", "--json", *common)
        assert {r["name"]: r["revoked"] for r in json.loads(out)} == {"ci": True, "ops": False}

        code, _, err = await cli(capsys, "key", "revoke", "0123456789ab", *common)
        assert code == 1 and "no API key with id '0123456789ab'" in err
        nats_server.stop()
        code, _, err = await cli(capsys, "key", "ls", *common)
        assert code == 1 and "cannot reach NATS" in err
    finally:
        await worker.stop()


async def test_cli_uses_the_operator_credential_on_an_auth_enabled_server(secured_nats, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")
    for var in ("STRATA_NATS_USER", "STRATA_NATS_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    operator = ["--nats-url", secured_nats.url, "--data-dir", str(secured_nats.data_dir)]
    code, out, err = await cli(capsys, "key", "create", "--name", "app", *operator)
    assert code == 0 and out.strip().startswith("sk-strata-"), err
    inference_key = out.strip()
    code, out, _ = await cli(capsys, "key", "ls", "--json", *operator)
    assert [r["name"] for r in json.loads(out)] == ["app"]

    # the client credential (any CLI user) may not touch the keys: a clear refusal, not a time-out
    monkeypatch.setenv("STRATA_NATS_USER", "client")
    monkeypatch.setenv("STRATA_NATS_PASSWORD", secured_nats.credentials["client"].password)
    began = time.monotonic()
    code, _, err = await cli(capsys, "key", "create", "--name", "sneaky", *operator)
    assert code == 1 and "permission denied" in err and time.monotonic() - began < 4.5
    monkeypatch.delenv("STRATA_NATS_USER")
    monkeypatch.delenv("STRATA_NATS_PASSWORD")

    # model-store reads the bucket under its own user: the key is known there, and lacks admin
    service = make_service("model-store", secured_nats.url_for("model-store"), tmp_path / "store")
    with serve(service) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            refused = await http.post(
                f"{url}/v1/aliases", json={"ref": "m:1", "alias": "prod"}, headers=bearer(inference_key)
            )
    assert refused.status_code == 403, refused.text
    assert [v for v in secured_nats.violations() if 'user:client"' not in v] == []


async def test_cli_ls_skips_a_malformed_record_and_says_so_in_one_line(nats_server, tmp_path, capsys):
    """#19 finding 9: one bad record in the bucket crashed `strata key ls` with a pydantic traceback."""
    common = ["--nats-url", nats_server.url, "--data-dir", str(tmp_path / "no-auth-here")]
    code, out, _ = await cli(capsys, "key", "create", "--name", "good", *common)
    good = out.strip()
    async with key_store(nats_server.url) as keys:
        await keys.kv.put("badrecord001", b'{"name": "half a record"}')
        await keys.kv.put("notjson00002", b"\x00\xff not json")
        assert (await keys.lookup(good)) is not None and await keys.get("badrecord001") is None
    for json_flag in ([], ["--json"]):
        code, out, err = await cli(capsys, "key", "ls", *json_flag, *common)
        assert code == 0, err
        assert key_id(good) in out and "Traceback" not in out + err
        warnings = [line for line in err.splitlines() if "unreadable" in line]
        assert len(warnings) == 1 and "badrecord001" in warnings[0] and "notjson00002" in warnings[0], err
