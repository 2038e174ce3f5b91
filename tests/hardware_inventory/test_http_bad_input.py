"""Bad queries that schemathesis found answered with a 500 (tests/fuzz/test_http_fuzz.py): each is a 422 now."""

from __future__ import annotations

from tests.hardware_inventory.conftest import Cluster
from tests.hardware_inventory.test_interfaces import Http


async def test_fit_rejects_an_empty_model_ref_and_an_oversized_batch_with_422(cluster: Cluster):
    async with Http(cluster.registry.http) as http:
        empty = await http.get("/fit", params={"model_ref": ""})
        assert empty.status_code == 422 and "model_ref" in empty.text
        huge = await http.get("/fit", params={"model_ref": "small", "batch": 4097})
        assert huge.status_code == 422 and "batch" in huge.text
        assert (await http.get("/fit", params={"model_ref": "small", "batch": 4096})).status_code == 200
