"""Who may administer JetStream, write the API keys and read replies (#19 findings 1, 2 and 8), against a
real nats-server started with the generated config.

The table test sends every role every administration subject (stream create/update/delete/purge, a
message delete, another service's durable consumer, a write to the API keys) and expects the server to
refuse exactly where ``nats_auth.may_administer`` / ``nats_auth.may_write_api_keys`` say so; afterwards
every stream is still there, unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import nats
import pytest
from nats.js.api import StreamConfig

from shared import nats_auth, subjects
from shared.catalog import BLOB_BUCKET
from shared.apikeys import record_for
from shared.events import NodeLost
from tests.security.conftest import connect_as, wait_for
from tests.support.helpers import flushed

pytestmark = pytest.mark.timeout(120)
STREAMS = nats_auth.ALL_STREAMS
OTHER_DURABLES = [
    (stream, durable, owner) for owner, needs in nats_auth.NEEDS.items() for stream, durable in needs.durables
]


async def _stream_configs(server) -> dict[str, tuple[StreamConfig, int]]:
    nc, _ = await connect_as(server.url_for(nats_auth.ADMIN))
    try:
        js = nc.jetstream()
        infos = [await js.stream_info(name) for name in STREAMS]
        return {i.config.name: (i.config, i.state.messages) for i in infos}
    finally:
        await nc.close()


def _admin_subjects(stream: str) -> list[str]:
    body = [f"$JS.API.STREAM.{op}.{stream}" for op in ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE")]
    return body


async def test_the_monitor_cannot_shrink_events_or_make_it_store_prompts(secured_nats):
    """Finding 1 as reported: max_msgs=1 with the monitor's credential, and infer.request.> added to EVENTS."""
    inventory, _ = await connect_as(secured_nats.url_for("hardware-inventory"))
    for _ in range(3):
        await inventory.jetstream().publish(NodeLost.subject(), b"{}")
    await inventory.close()
    nc, errors = await connect_as(secured_nats.url_for("monitor"))
    js = nc.jetstream(timeout=1)
    config = (await js.stream_info(subjects.EVENTS_STREAM)).config
    for changed in (
        dataclasses.replace(config, max_msgs=1),
        dataclasses.replace(config, subjects=[*config.subjects, "infer.request.>"]),
    ):
        with pytest.raises(nats.errors.TimeoutError):
            await js.update_stream(changed)
    await wait_for(lambda: len(errors.violations()) == 2)
    assert errors.violations() == ['nats: permissions violation for publish to "$js.api.stream.update.events"'] * 2
    await nc.close()
    config_after, messages = (await _stream_configs(secured_nats))[subjects.EVENTS_STREAM]
    assert messages == 3 and config_after.subjects == [subjects.EVENTS_ALL] and config_after.max_msgs in (None, -1)


async def test_every_role_is_refused_stream_administration_except_the_bootstrap_admin(secured_nats):
    before = await _stream_configs(secured_nats)
    refused: dict[str, list[str]] = {}
    for role in nats_auth.ROLES:
        if role == nats_auth.ADMIN:
            continue
        nc, errors = await connect_as(secured_nats.url_for(role))
        sent = []
        for stream in STREAMS:
            for subject in _admin_subjects(stream):
                if subject == f"$JS.API.STREAM.PURGE.{stream}" and nats_auth.may_purge(role, stream):
                    continue  # the one purge granted (below): model-store's cleanup of its own blob store
                await nc.publish(subject, b"{}", reply=nc.new_inbox())
                sent.append(subject.lower())
        for stream, durable, owner in OTHER_DURABLES:
            if owner == role:
                continue
            for subject in (
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.evt.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.1.1.1.1.1",
            ):
                await nc.publish(subject, b"{}", reply=nc.new_inbox())
                sent.append(subject.lower())
        await flushed(nc)
        await wait_for(lambda errors=errors, sent=sent: len(errors.violations()) >= len(sent))
        refused[role] = sorted(errors.violations())
        await nc.close()
        expected = sorted(f'nats: permissions violation for publish to "{s}"' for s in sent)
        assert refused[role] == expected, role
    assert await _stream_configs(secured_nats) == before  # nothing changed, nothing deleted or purged


async def test_model_store_may_purge_its_blob_store_and_no_other_stream(secured_nats):
    """The one purge a non-admin role has: model-store removes its own partial objects' chunks (#20 item 3)."""
    granted = [
        (role, stream)
        for role in nats_auth.ROLES
        if role != nats_auth.ADMIN
        for stream in STREAMS
        if nats_auth.may_purge(role, stream)
    ]
    blobs = nats_auth.obj_stream(BLOB_BUCKET)
    assert granted == [("model-store", blobs)]
    nc, errors = await connect_as(secured_nats.url_for("model-store"))
    answer = await nc.request(
        f"$JS.API.STREAM.PURGE.{blobs}", json.dumps({"filter": f"$O.{BLOB_BUCKET}.C.none"}).encode(), timeout=5
    )
    assert json.loads(answer.data)["success"] is True, answer.data
    assert errors.violations() == []
    await nc.close()


async def test_a_role_cannot_take_over_another_services_durable_through_the_ephemeral_create(secured_nats):
    """``$JS.API.CONSUMER.CREATE.EVENTS`` (no name in the subject) must not create or update a durable
    named in the body: the monitor's durable keeps its filter."""
    monitor, _ = await connect_as(secured_nats.url_for("monitor"))
    await monitor.jetstream().pull_subscribe(subjects.EVENTS_ALL, durable="monitor", stream=subjects.EVENTS_STREAM)
    ledger, _ = await connect_as(secured_nats.url_for("provenance-ledger"))
    body = {
        "stream_name": subjects.EVENTS_STREAM,
        "config": {
            "name": "monitor",
            "durable_name": "monitor",
            "filter_subject": "evt.nothing",
            "ack_policy": "explicit",
        },
    }
    reply = await ledger.request(
        f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}", json.dumps(body).encode(), timeout=5
    )
    assert "error" in json.loads(reply.data), reply.data
    info = await monitor.jetstream().consumer_info(subjects.EVENTS_STREAM, "monitor")
    assert info.config.filter_subject == subjects.EVENTS_ALL
    await ledger.close()
    await monitor.close()


async def test_the_gateway_cannot_write_api_key_records(secured_nats):
    """Finding 2: a record written with the edge's credential would be honoured as an admin key everywhere."""
    nc, errors = await connect_as(secured_nats.url_for("api-gateway"))
    kv = await nc.jetstream(timeout=1).key_value(nats_auth.API_KEYS_BUCKET)
    record = record_for("sk-strata-forged", "forged", ["admin"])
    with pytest.raises(nats.errors.TimeoutError):
        await kv.put(record.id, record.model_dump_json(exclude={"id"}).encode())
    await wait_for(errors.violations)
    assert errors.violations() == [f'nats: permissions violation for publish to "$kv.strata-api-keys.{record.id}"']
    assert (await kv.status()).values == 0
    await nc.close()
    writers = [r for r in nats_auth.ROLES if nats_auth.may_write_api_keys(r)]
    assert writers == [nats_auth.OPERATOR]


async def test_a_service_reads_only_its_own_replies(secured_nats):
    """Finding 8: the monitor read a completion from the worker's reply on _INBOX.>."""
    monitor, errors = await connect_as(secured_nats.url_for("monitor"))
    await monitor.subscribe("_INBOX.>")
    await monitor.subscribe(f"{nats_auth.inbox_prefix('api-gateway')}.>")
    await flushed(monitor)
    await wait_for(lambda: len(errors.violations()) == 2)
    assert sorted(errors.violations()) == sorted(
        [
            'nats: permissions violation for subscription to "_inbox.>"',
            'nats: permissions violation for subscription to "_inbox.api-gateway.>"',
        ]
    )
    # request-reply still works for each role, on its own prefix
    worker, _ = await connect_as(secured_nats.url_for("inference-worker"))
    gateway, gateway_errors = await connect_as(secured_nats.url_for("api-gateway"))
    seen: list[bytes] = []
    sniffer, _ = await connect_as(secured_nats.url_for("client"))

    async def sniff(msg) -> None:
        seen.append(msg.data)

    await sniffer.subscribe("_INBOX.>", cb=sniff)  # the client role may hold _INBOX.>, minus the others' prefixes

    async def answer(msg) -> None:
        await msg.respond(b"the secret completion")

    await worker.subscribe("infer.request.m", cb=answer)
    await flushed(worker)
    reply = await gateway.request("infer.request.m", b"prompt", timeout=5)
    assert reply.data == b"the secret completion" and gateway_errors.violations() == []
    await asyncio.sleep(0.2)
    assert seen == []
    for nc in (monitor, worker, gateway, sniffer):
        await nc.close()


async def test_strata_provision_runs_as_admin_and_another_credential_is_refused_at_once(
    secured_nats, capsys, monkeypatch
):
    from cli.main import main as strata

    common = ["provision", "--nats-url", secured_nats.url, "--data-dir", str(secured_nats.data_dir)]
    assert await asyncio.to_thread(strata, common) == 0
    assert "provisioned 9 streams and buckets (1 replica(s))" in capsys.readouterr().out
    monitor = secured_nats.credentials["monitor"]
    monkeypatch.setenv(nats_auth.USER_ENV, monitor.user)
    monkeypatch.setenv(nats_auth.PASSWORD_ENV, monitor.password)
    started = asyncio.get_running_loop().time()
    assert await asyncio.to_thread(strata, common) == 1
    assert asyncio.get_running_loop().time() - started < 5, "a refusal is said at once, not after a time-out"
    err = capsys.readouterr().err
    assert "permission denied: this NATS user may not create streams" in err and "$js.api.stream.update.events" in err
