"""The admission policy end to end: a real nats-server, real model-store pushes (a dataset and tiny
checkpoints, signed by the store), the registry with scripted agents (an edge node binpack would
prefer, a core node), the provenance-ledger; deploys by event and by real HTTP (uvicorn).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import AsyncExitStack

import httpx
import nats

from services.model_store.domain.signing import Signer
from shared import bus, rpc, subjects
from shared.catalog import CATALOG_BUCKET, PushDatasetRequest, PushModelRequest, ResolvedModel, ResolveRequest
from shared.events import DeployRequested, Source, make_event, parse_event
from tests.hardware_inventory.conftest import NODES, Cluster, probe
from tests.hardware_inventory.test_interfaces import Http
from tests.model_store.conftest import make_checkpoint, upload_dir
from tests.support.helpers import eventually, make_service

CLIENT = Source(service="cli", node="laptop")


async def _resign_in_catalog(nc, model: ResolvedModel, attacker: Signer) -> None:
    """What someone with write access to the KV catalog could do: sign the manifest with their own key."""
    kv = await nc.jetstream().key_value(CATALOG_BUCKET)
    key = f"model.{model.model.name}.{model.model.version}"
    stored = json.loads((await kv.get(key)).value)
    stored["signature"] = attacker.sign(model.manifest)
    await kv.put(key, json.dumps(stored).encode())
    for _ in range(200):  # model-store's index follows the KV bucket
        served = await rpc.call(
            nc, subjects.rpc("model-store", "resolve"), ResolveRequest(ref=model.model.name), ResolvedModel
        )
        if served.signature == stored["signature"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("model-store did not serve the re-signed record")


async def test_policy_end_to_end_with_model_store_registry_and_ledger(nats_server, tmp_path, monkeypatch):
    other_key = Signer.load_or_create(tmp_path / "attacker.pem")
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")
    monkeypatch.setitem(
        NODES, "edge-4", probe("edge-4", 4, labels={"tier": "edge"})
    )  # binpack's choice, but for the policy
    monkeypatch.setitem(NODES, "core-64", probe("core-64", 64, labels={"tier": "core"}))
    store = make_service("model-store", nats_server.url, tmp_path / "store")
    ledger = make_service("provenance-ledger", nats_server.url, tmp_path / "ledger")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(store.running())
        await stack.enter_async_context(ledger.running())
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)
        events: list = []

        async def record(msg) -> None:
            try:
                events.append(parse_event(msg.data, msg.subject))
            except Exception:  # not an event this test sent for
                pass

        await nc.subscribe("evt.>", cb=record)

        # 1. real pushes: a dataset, then four models of one tiny checkpoint (640 parameters)
        checkpoint = make_checkpoint(tmp_path / "ckpt")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=store.http), base_url="http://store") as client:
            (tmp_path / "corpus").mkdir()
            (tmp_path / "corpus" / "verses.txt").write_text("In the beginning\n")
            files = await upload_dir(client, tmp_path / "corpus")
            r = await client.post(
                "/v1/datasets", json=PushDatasetRequest(name="corpus", files=files).model_dump(mode="json")
            )
            assert r.status_code == 201, r.text
            dataset = r.json()["digest"]
            files = await upload_dir(client, checkpoint)
            pushed = {}
            for name, license, datasets in (
                ("good", "MIT", [dataset]),
                ("nodata", "MIT", []),
                ("gpl", "GPL-3.0", [dataset]),
                ("forged", "MIT", [dataset]),
            ):
                r = await client.post(
                    "/v1/models",
                    json=PushModelRequest(name=name, files=files, license=license, datasets=datasets).model_dump(
                        mode="json"
                    ),
                )
                assert r.status_code == 201, r.text
                pushed[name] = ResolvedModel.model_validate(r.json())
            store_pem = (await client.get("/v1/public-key")).json()["pem"]
        await _resign_in_catalog(nc, pushed["forged"], other_key)

        # 2. the policy: model-store's key (a file next to the policy), datasets, licenses, an edge limit
        (tmp_path / "store.pem").write_text(store_pem)
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(
            "require_signature: true\ntrusted_keys: [store.pem]\nrequire_datasets: true\n"
            "allowed_licenses: [mit, apache-2.0]\nnode_labels:\n  tier=edge: {max_parameters: 100}\n"
        )
        digest = "sha256:" + hashlib.sha256(policy_file.read_bytes()).hexdigest()
        cluster = Cluster(nats_server.url, tmp_path, stack)
        registry = await cluster.start_registry(admission_policy=policy_file)
        for node_id in ("edge-4", "core-64"):
            await cluster.start_agent(node_id)
            stack.push_async_callback(cluster.stop_agent, node_id)
        await cluster.wait_nodes(2)

        async def outcome(deployment_id: str):
            def decided():
                return [
                    e
                    for e in events
                    if getattr(e.data, "deployment_id", None) == deployment_id
                    and e.type in ("policy.decided", "deploy.scheduled", "deploy.rejected")
                ]

            await eventually(
                lambda: len(decided()) == 2, timeout=20, what=f"policy.decided and the outcome of {deployment_id}"
            )
            policy_event, result = decided()  # in this order: the decision before what it led to
            assert policy_event.type == "policy.decided" and policy_event.data.policy_digest == digest
            return policy_event.data, result

        # 3. a compliant model, by event: admitted, and kept off the edge node binpack would have chosen
        await bus.publish(
            registry.broker, make_event(DeployRequested(deployment_id="dep-good", model_ref="good"), CLIENT)
        )
        decision, result = await outcome("dep-good")
        assert decision.admitted and decision.model == pushed["good"].model and all(r.passed for r in decision.rules)
        assert [r.rule for r in decision.rules] == [
            "require_signature",
            "require_datasets",
            "allowed_licenses",
            "node_labels[tier=edge]",
        ]
        assert result.type == "deploy.scheduled" and result.data.node_id == "core-64"

        # 4. each rule broken once: deploy.rejected naming the rule, and a policy.decided that says rejected
        broken = {
            "dep-nodata": ("nodata", {}, "policy: require_datasets: the model declares no training datasets"),
            "dep-forged": ("forged", {}, "policy: require_signature: no valid signature by a trusted key"),
            "dep-edge": (
                "good",
                {"label.tier": "edge"},
                "policy: node_labels[tier=edge]: over max_parameters 100 (the model has 640)",
            ),
        }
        for deployment_id, (ref, constraints, _) in broken.items():
            await bus.publish(
                registry.broker,
                make_event(
                    DeployRequested(deployment_id=deployment_id, model_ref=ref, constraints=constraints), CLIENT
                ),
            )
        async with Http(registry.http) as http:  # by HTTP: 403 with the same reason
            r = await http.post("/deployments", json={"model_ref": "gpl", "deployment_id": "dep-gpl"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        gpl_reason = "policy: allowed_licenses: license 'GPL-3.0' is not allowed (allowed: mit, apache-2.0)"
        assert r.json()["error"]["message"] == gpl_reason
        broken["dep-gpl"] = ("gpl", {}, gpl_reason)
        for deployment_id, (_, _, reason) in broken.items():
            decision, result = await outcome(deployment_id)
            assert result.type == "deploy.rejected" and result.data.reason.startswith(reason), result.data.reason
            assert not decision.admitted
            [failed] = [r for r in decision.rules if not r.passed]
            assert reason.startswith(f"policy: {failed.rule}: ")
        assert other_key.key_id[:16] in cluster_reason(events, "dep-forged")  # the key that did sign it is named
        assert "every eligible node (1) is labelled tier=edge" in cluster_reason(events, "dep-edge")

        # 5. the ledger recorded every decision as a leaf
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ledger.http), base_url="http://ledger"
        ) as client:

            async def recorded() -> dict:
                r = await client.get("/audit", params={"type": "policy.decided"})
                return {e["data"]["deployment_id"]: e for e in r.json()}

            entries: dict = {}

            async def poll():
                while len(entries) < 5:
                    entries.update(await recorded())
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(poll(), 20)
            assert set(entries) == {"dep-good", *broken}
            assert entries["dep-good"]["data"]["admitted"] and not entries["dep-gpl"]["data"]["admitted"]
            assert entries["dep-gpl"]["data"]["policy_digest"] == digest
            leaf = (await client.get(f"/leaves/{entries['dep-forged']['leaf_index']}")).json()
            assert (
                leaf["event"]["type"] == "policy.decided" and leaf["event"]["id"] == entries["dep-forged"]["event_id"]
            )
            assert {"rule": "require_signature", "passed": False}.items() <= leaf["event"]["data"]["rules"][0].items()


def cluster_reason(events: list, deployment_id: str) -> str:
    [rejected] = [e.data for e in events if e.type == "deploy.rejected" and e.data.deployment_id == deployment_id]
    return rejected.reason
