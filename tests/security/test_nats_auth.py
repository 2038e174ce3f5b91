"""NATS users and permissions (shared/nats_auth.py) against a real nats-server started with the
generated config: the denials the issue names, and every service doing its work under its own user."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from contextlib import AsyncExitStack

import nats
import pytest

from cli import natsd
from shared import nats_auth, subjects
from shared.config import SERVICES
from shared.events import EventData
from tests.security.conftest import connect_as, wait_for
from tests.support.helpers import flushed, make_service

pytestmark = pytest.mark.timeout(180)
EVENT_SUBJECTS = sorted(cls.subject() for cls in EventData.registry.values())


# -- the permissions themselves ---------------------------------------------------------------
def test_each_event_subject_may_be_published_by_its_publisher_only():
    for cls in EventData.registry.values():
        allowed = [role for role in nats_auth.ROLES if cls.subject() in nats_auth.permissions(role).publish]
        assert allowed == [cls.PUBLISHER], cls.TYPE
    for role in nats_auth.ROLES:  # and nobody gets a wildcard over events
        assert not {"evt.>", "live.>", ">", "evt.*"} & set(nats_auth.permissions(role).publish), role


def test_only_the_bootstrap_admin_may_create_change_or_delete_a_stream_and_each_role_writes_its_own_store():
    assert [r for r in nats_auth.ROLES if nats_auth.may_administer(r)] == [nats_auth.ADMIN]
    for role in nats_auth.ROLES:
        publish = nats_auth.permissions(role).publish
        if role != nats_auth.ADMIN:
            # model-store purges its own blob store's partial objects (#20 item 3): that stream only
            purges = ["$JS.API.STREAM.PURGE.OBJ_strata-blobs"] if role == "model-store" else []
            assert [s for s in publish if s.startswith("$JS.API.STREAM.") and not s.startswith(
                ("$JS.API.STREAM.INFO.", "$JS.API.STREAM.MSG.GET.", "$JS.API.STREAM.NAMES"))] == purges, role
        kv_writes = [s for s in publish if s.startswith(("$KV.", "$O."))]
        owned = {"model-store": ["$KV.strata-catalog.>", "$O.strata-blobs.>"],
                 "hardware-inventory": ["$KV.strata-inventory.>"], "api-gateway": ["$KV.strata-quotas.>"],
                 "operator": ["$KV.strata-api-keys.>"]}
        assert kv_writes == owned.get(role, []), role


# Each role's core subscriptions, pinned: a wider one (">", "evt.>", "infer.request.>") must fail here.
SUBSCRIBE = {
    "model-store": ["_INBOX.model-store.>", "rpc.model-store.>"],
    "hardware-inventory": [
        "evt.deploy.>",
        "live.node.heartbeat",
        "_INBOX.hardware-inventory.>",
        "rpc.hardware-inventory.>",
    ],
    "inference-worker": [
        "infer.request.>",
        "infer.embed.>",
        "infer.cancel",
        "_INBOX.inference-worker.>",
        "rpc.inference-worker.>",
    ],
    "provenance-ledger": ["_INBOX.provenance-ledger.>", "rpc.provenance-ledger.>"],
    "monitor": ["live.node.heartbeat", "_INBOX.monitor.>", "rpc.monitor.>"],
    "api-gateway": ["evt.inference.completed", "_INBOX.api-gateway.>", "rpc.api-gateway.>"],
    "client": ["evt.>", "live.>", "_INBOX.>"],
    "app": ["_INBOX.app.>"],
    "operator": ["_INBOX.operator.>"],
    "admin": ["_INBOX.admin.>"],
}


def test_each_roles_subscriptions_are_exactly_what_it_needs():
    assert set(SUBSCRIBE) == set(nats_auth.ROLES)
    for role, expected in SUBSCRIBE.items():
        assert list(nats_auth.permissions(role).subscribe) == expected, role
    wide = {">", "evt.>", "infer.request.>", "infer.embed.>", "_INBOX.>"}
    assert {role: sorted(wide & set(nats_auth.permissions(role).subscribe)) for role in nats_auth.ROLES} == {
        **{role: [] for role in nats_auth.ROLES},
        "inference-worker": ["infer.embed.>", "infer.request.>"],  # it serves the requests (and embeddings: #18)
        "client": ["_INBOX.>", "evt.>"],  # `strata events`, and programs on nats-py's default inbox
    }
    # the client's _INBOX.> stops short of every other role's replies
    assert sorted(nats_auth.permissions("client").subscribe_deny) == sorted(
        f"_INBOX.{r}.>" for r in nats_auth.ROLES if r != "client"
    )


def test_credentials_are_private_reused_and_rotated(tmp_path):
    config = nats_auth.write(tmp_path)
    folder = nats_auth.auth_dir(tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in [config, *folder.glob("*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    first = nats_auth.credentials(tmp_path)
    assert set(first) == set(nats_auth.ROLES)
    assert nats_auth.credentials(tmp_path) == first  # a restart keeps them
    rotated = nats_auth.credentials(tmp_path, rotate=True)
    assert all(rotated[r].password != first[r].password for r in nats_auth.ROLES)
    checked = subprocess.run([str(natsd.binary()), "-c", str(config), "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_env_credentials_go_into_every_url_unless_one_names_its_own():
    env = {nats_auth.USER_ENV: "monitor", nats_auth.PASSWORD_ENV: "s3cret"}
    assert nats_auth.with_env_credentials("nats://h:4222", env) == "nats://monitor:s3cret@h:4222"
    assert (
        nats_auth.with_env_credentials("nats://a:1,nats://b:2", env)
        == "nats://monitor:s3cret@a:1,nats://monitor:s3cret@b:2"
    )
    assert nats_auth.with_env_credentials("nats://x:y@h:4222", env) == "nats://x:y@h:4222"
    assert nats_auth.with_env_credentials("nats://h:4222", {}) == "nats://h:4222"


# -- denials on a real server -----------------------------------------------------------------
async def _events_in_stream(server) -> int:
    nc, _ = await connect_as(server.url_for("client"))
    try:
        return (await nc.jetstream().stream_info(subjects.EVENTS_STREAM)).state.messages
    finally:
        await nc.close()


async def test_a_worker_cannot_publish_model_registered(secured_nats):
    nc, errors = await connect_as(secured_nats.url_for("inference-worker"))
    await nc.publish("evt.model.registered", b"{}")
    await flushed(nc)
    await wait_for(errors.violations)
    assert errors.violations() == ['nats: permissions violation for publish to "evt.model.registered"']
    with pytest.raises(nats.errors.TimeoutError):  # through JetStream: no PubAck, since the server dropped it
        await nc.jetstream().publish("evt.model.registered", b"{}", timeout=1)
    await nc.close()
    assert await _events_in_stream(secured_nats) == 0
    assert any(
        'user:inference-worker"' in line and "evt.model.registered" in line for line in secured_nats.violations()
    )


async def test_the_gateway_cannot_publish_any_event(secured_nats):
    nc, errors = await connect_as(secured_nats.url_for("api-gateway"))
    for subject in EVENT_SUBJECTS:
        await nc.publish(subject, b"{}")
    await flushed(nc)
    await wait_for(lambda: len(errors.violations()) == len(EVENT_SUBJECTS))
    assert sorted(errors.violations()) == sorted(
        f'nats: permissions violation for publish to "{s}"' for s in EVENT_SUBJECTS
    )
    await nc.close()


async def test_a_service_cannot_read_what_is_not_its_business(secured_nats):
    """The monitor may not subscribe to inference requests (prompts), nor write the model catalog."""
    nc, errors = await connect_as(secured_nats.url_for("monitor"))
    await nc.subscribe("infer.request.>")
    await nc.publish("$KV.strata-catalog.model.x", b"{}")
    await flushed(nc)
    await wait_for(lambda: len(errors.violations()) == 2)
    assert sorted(errors.violations()) == sorted(
        [
            'nats: permissions violation for publish to "$kv.strata-catalog.model.x"',
            'nats: permissions violation for subscription to "infer.request.>"',
        ]
    )
    await nc.close()


@pytest.mark.parametrize("who", ["intruder:guess", "model-store:wrong-password"])
async def test_an_unknown_user_or_a_wrong_password_cannot_connect(secured_nats, who):
    url = secured_nats.url.replace("nats://", f"nats://{who}@")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
    assert f'authentication error - User "{who.split(":")[0]}"' in secured_nats.log.read_text()


async def test_an_anonymous_connection_gets_the_client_role_only(secured_nats):
    nc, errors = await connect_as(secured_nats.url)  # no credentials: no_auth_user = client
    ack = await nc.jetstream().publish("evt.deploy.requested", b"{}", timeout=5)
    assert ack.stream == subjects.EVENTS_STREAM
    await nc.publish("evt.model.registered", b"{}")
    await nc.publish("$JS.API.STREAM.DELETE.EVENTS", b"")
    await flushed(nc)
    await wait_for(lambda: len(errors.violations()) == 2)
    assert len(errors.violations()) == 2, errors.seen
    await nc.close()
    assert await _events_in_stream(secured_nats) == 1


async def test_the_app_credential_sends_inference_and_reads_results_and_nothing_else(secured_nats):
    """A user's program (README, "Over NATS"): a job goes into JOBS and its result is read back from
    RESULTS; an event, an RPC, a cancel, a stream deletion and a wider subscription are refused."""
    nc, errors = await connect_as(secured_nats.url_for(nats_auth.APP))
    js = nc.jetstream()
    ack = await js.publish(subjects.inference_job("m"), b"{}", timeout=5)
    assert ack.stream == "JOBS"
    worker, _ = await connect_as(secured_nats.url_for("inference-worker"))
    await worker.jetstream().publish(subjects.inference_result("r1"), b'{"ok": true}', timeout=5)
    await worker.close()
    sub = await js.subscribe(subjects.inference_result("r1"), stream="RESULTS")
    assert (await sub.next_msg(timeout=5)).data == b'{"ok": true}'
    with pytest.raises(nats.errors.NoRespondersError):  # allowed, only nobody serves model m here
        await nc.request(subjects.inference_request("m"), b"{}", timeout=2)
    refused_pub = [
        "evt.deploy.requested",
        "rpc.model-store.health",
        "infer.cancel",
        "infer.results.r2",
        "$JS.API.STREAM.DELETE.JOBS",
        "$JS.API.STREAM.PURGE.RESULTS",
        "$KV.strata-api-keys.x",
        "infer.request.m.gateway",
        "infer.embed.m.gateway",
    ]  # the gateway's: they name the API key that asked
    for subject in refused_pub:
        await nc.publish(subject, b"{}")
    refused_sub = ["_INBOX.>", "_INBOX.client.x", "_INBOX.api-gateway.>", "infer.request.>", "infer.results.>", "evt.>"]
    for subject in refused_sub:
        await nc.subscribe(subject)
    await flushed(nc)
    await wait_for(lambda: len(errors.violations()) == len(refused_pub) + len(refused_sub))
    assert sorted(v.lower() for v in errors.violations()) == sorted(  # nats-py lowercases some subjects
        [f'nats: permissions violation for publish to "{s.lower()}"' for s in refused_pub]
        + [f'nats: permissions violation for subscription to "{s.lower()}"' for s in refused_sub]
    )
    await nc.close()


async def test_only_the_gateway_may_send_requests_that_name_an_api_key(secured_nats):
    """An attributed request (api_key_id, client_request_id: shared/inference_client.request_subject)
    travels on its model's gateway subject; the CLI's client role, like an app, may use only the plain one."""
    attributed = [subjects.inference_request("m", attributed=True), subjects.embedding_request("m", attributed=True)]
    assert attributed == ["infer.request.m.gateway", "infer.embed.m.gateway"]
    gateway, gateway_errors = await connect_as(secured_nats.url_for("api-gateway"))
    client, client_errors = await connect_as(secured_nats.url)  # anonymous: the client role
    for subject in attributed:
        await gateway.publish(subject, b"{}")
        await client.publish(subject, b"{}")
    await flushed(gateway)
    await flushed(client)
    await wait_for(lambda: len(client_errors.violations()) == 2)
    assert gateway_errors.violations() == []
    await gateway.close()
    await client.close()


# -- what each service needs, it may do -------------------------------------------------------
async def test_each_role_may_publish_its_own_events(secured_nats):
    published = 0
    for role in nats_auth.ROLES:
        nc, errors = await connect_as(secured_nats.url_for(role))
        for cls in EventData.registry.values():
            if cls.PUBLISHER != role:
                continue
            if cls.PERSISTENT:
                ack = await nc.jetstream().publish(cls.subject(), b"{}", timeout=5)
                assert ack.stream == subjects.EVENTS_STREAM
                published += 1
            else:
                await nc.publish(cls.subject(), b"{}")
        await flushed(nc)
        await nc.close()
        assert errors.violations() == [], role
    assert await _events_in_stream(secured_nats) == published
    assert secured_nats.violations() == []


async def test_every_service_works_under_its_own_user_push_deploy_infer(secured_nats, tmp_path):
    """All six services in-process, each with its own credential: healthy over RPC, the built-in model
    registered (model-store), deployed (inventory -> worker fetch from the Object Store) and answering an
    inference from a client; the server logged no permission violation on the way."""
    from cli.builtin import serve_builtin
    from shared.embeddings import EmbeddingRequest, embed
    from shared.inference import InferenceRequest, SamplingOptions
    from shared.inference_client import complete

    async with AsyncExitStack() as stack:
        for name in SERVICES:
            service = make_service(name, secured_nats.url_for(name), tmp_path / "services", node_id="node-sec")
            await stack.enter_async_context(service.running())
        client, errors = await connect_as(secured_nats.url_for("client"))
        stack.push_async_callback(client.close)
        for name in SERVICES:
            reply = await client.request(subjects.rpc(name, "health"), b"", timeout=10)
            assert b'"status":"ok"' in reply.data.replace(b" ", b""), (name, reply.data)
        outcome = await serve_builtin(client, timeout_s=150)
        assert outcome.endswith("is serving"), outcome
        answer = await complete(
            client,
            InferenceRequest(
                model="strata-builtin-kjv",
                prompt="In the beginning",
                sampling=SamplingOptions(max_tokens=4, temperature=0),
            ),
        )
        assert answer.usage.completion_tokens == 4 and answer.model.name == "strata-builtin-kjv"
        # embeddings (#18): the gateway and the client may ask, the worker answers on infer.embed.<model>
        gateway, gateway_errors = await connect_as(secured_nats.url_for("api-gateway"))
        stack.push_async_callback(gateway.close)
        for nc in (client, gateway):
            vectors = await embed(nc, EmbeddingRequest(model="strata-builtin-kjv", inputs=["In the beginning", [5, 6]]))
            assert vectors.reply.count == 2 and vectors.reply.prompt_tokens > 2
        assert errors.violations() == [] and gateway_errors.violations() == []
    assert secured_nats.violations() == []


def test_the_permissions_table_in_the_docs_is_the_one_the_code_makes():
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    between = docs.split("<!-- permissions:begin -->\n", 1)[1].split("<!-- permissions:end -->", 1)[0]
    assert between == nats_auth.permissions_table(), "run `strata permissions` and paste it into docs/operations.md"


def test_the_durables_in_the_table_are_the_ones_the_services_use():
    from services.monitor.config import MonitorConfig
    from services.monitor.entrypoints.app import DEAD_LETTER_DURABLE
    from services.provenance_ledger.adapters.ingest import DURABLE as LEDGER_DURABLE

    owned = {role: set(needs.durables) for role, needs in nats_auth.NEEDS.items() if needs.durables}
    assert owned == {
        "hardware-inventory": {
            (subjects.EVENTS_STREAM, "hardware-inventory"),
            (subjects.EVENTS_STREAM, "hardware-inventory-nodes"),
        },
        "provenance-ledger": {(subjects.EVENTS_STREAM, LEDGER_DURABLE)},
        "monitor": {
            (subjects.EVENTS_STREAM, MonitorConfig().events_durable),
            (subjects.DEADLETTER_STREAM, DEAD_LETTER_DURABLE),
        },
    }
