"""Bad input that schemathesis found answered with a 500 (tests/fuzz/test_http_fuzz.py): a clear 4xx now."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize(("name", "alias"), [("ñame", "prod"), ("tiny", "a b"), ("tiny", "*"), ("ti>ny", "prod")])
def test_removing_an_alias_with_a_malformed_name_or_alias_is_a_400(live_store, name: str, alias: str):
    r = httpx.delete(f"{live_store.url}/v1/models/{name}/aliases/{alias}")
    assert r.status_code == 400, r.text
    assert "malformed model reference" in r.json()["error"]["message"]


def test_removing_a_well_formed_alias_that_does_not_exist_is_still_a_404(live_store):
    r = httpx.delete(f"{live_store.url}/v1/models/tiny/aliases/prod")
    assert r.status_code == 404 and "no alias 'prod'" in r.json()["error"]["message"]
