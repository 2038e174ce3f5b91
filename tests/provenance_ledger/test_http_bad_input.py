"""A leaf index SQLite cannot hold was a 500 (OverflowError), found by schemathesis (tests/fuzz/test_http_fuzz.py):
every index outside the log is a 404 now."""

from __future__ import annotations

import pytest

from tests.provenance_ledger.conftest import publish_all, scripted_events, wait_ingested
from tests.provenance_ledger.test_api import serving


@pytest.mark.parametrize("index", ["-11521867042383961522176", str(2**63), str(2**64 + 5), "-1"])
async def test_a_leaf_index_outside_the_log_is_a_404_however_large(ledger_service, js, index: str):
    run = scripted_events(2)
    async with serving(ledger_service) as http:
        await publish_all(js, run.events)
        await wait_ingested(ledger_service, run.ids)
        r = await http.get(f"/leaves/{index}")
        assert r.status_code == 404 and "no leaf at index" in r.json()["error"]["message"], r.text
        assert (await http.get("/leaves/0")).status_code == 200
