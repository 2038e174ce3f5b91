"""An embeddings request's ``inference.embedded`` event (#18) gets a receipt from the ledger, as a
generation's ``inference.completed`` does: it verifies offline, commits to the inputs under the
requester's salt, and names the model, deployment and device through the request's lineage."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest

from services.provenance_ledger.domain.receipt import ReceiptInvalid, verify_receipt
from shared.embeddings import input_bytes
from shared.events import EmbeddingsCompleted, Source, make_event
from shared.prompt_commitment import commit, new_salt
from tests.provenance_ledger.conftest import DEVICE, MODEL, NODE, publish_all, scripted_events, wait_ingested
from tests.support.live import serve_on_loop

INPUTS = ["The quick brown fox", "jumps over"]


async def test_an_embeddings_event_has_a_receipt_that_verifies_and_commits_to_the_inputs(ledger_service, js):
    run = scripted_events(2)
    salt = new_salt()
    embedded = make_event(EmbeddingsCompleted(
        request_id="emb-1", model=MODEL, deployment_id="dep-1", node_id=NODE, device=DEVICE, inputs=2, prompt_tokens=9,
        dimensions=64, pooling="last", e2e_seconds=0.01, prompt_commitment=commit(input_bytes(INPUTS), salt),
        output_sha256=hashlib.sha256(b"vectors").hexdigest()), Source(service="inference-worker", node=NODE))
    async with (
        serve_on_loop(ledger_service.http, lifespan="on") as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await publish_all(js, [*run.events, embedded])
        await wait_ingested(ledger_service, {*run.ids, embedded.id})
        pem = (await http.get("/public-key")).text
        receipt = None
        for _ in range(50):  # the signed head covering the event comes with the next checkpoint
            r = await http.get("/receipts/emb-1")
            if r.status_code == 200:
                receipt = r.json()
                break
            await asyncio.sleep(0.2)
        assert receipt is not None, r.text
        lineage = (await http.get("/lineage/requests/emb-1")).json()
    assert receipt["event"]["type"] == "inference.embedded"
    check = verify_receipt(receipt, pem, prompt=input_bytes(INPUTS), salt=salt)
    assert check.ok and check.prompt_checked and check.request_id == "emb-1"
    with pytest.raises(ReceiptInvalid):  # nor against other inputs
        verify_receipt(receipt, pem, prompt=input_bytes(INPUTS[:1]), salt=salt)
    assert MODEL.digest in str(lineage) and DEVICE in str(lineage)
