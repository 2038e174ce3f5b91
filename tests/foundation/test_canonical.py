"""The one canonical JSON (shared/canonical.py): the bytes of manifest digests, DSSE payloads and ledger leaves."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.canonical import NotCanonical, canonical_json
from shared.errors import Invalid


# What both earlier definitions computed (shared/catalog.py's without allow_nan, the ledger's with it):
# for every value they both accepted, the bytes must stay these, or stored digests and leaves break.
def _before(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_the_bytes_are_those_of_before(value):
    assert canonical_json(value) == _before(value)


def test_known_bytes():
    value = {"z": [1, 2.5, None, True], "a": {"é": "ü\u2028\n\"", "b": -0.0}, "m": 10**20}
    assert (
        canonical_json(value)
        == '{"a":{"b":-0.0,"é":"ü\u2028\\n\\""},"m":100000000000000000000,"z":[1,2.5,null,true]}'.encode()
    )


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_clearly(number):
    with pytest.raises(NotCanonical, match="NaN and ±Infinity have no JSON form") as caught:
        canonical_json({"training_record": {"loss": number}})
    assert isinstance(caught.value, ValueError) and isinstance(
        caught.value, Invalid
    )  # a 400, and what callers caught before
