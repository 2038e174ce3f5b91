"""`strata deploy --keep-alive` durations and the on-demand columns of `strata deployments`."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from cli.inventory import _duration, _on_demand, _status


@pytest.mark.parametrize("text, seconds", [("30", 30), ("30s", 30), ("5m", 300), ("1h", 3600), ("0", 0), ("1.5m", 90),
                                           ("250ms", 0.25)])
def test_keep_alive_durations(text, seconds):
    assert _duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text, why", [("5 minutes", "expected a duration"), ("-1s", "must be >= 0"), ("m", "expected")]
)
def test_a_bad_keep_alive_says_what_is_expected(text, why):
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        _duration(text)


def test_the_columns_say_on_demand_loaded_or_not_and_the_keep_alive():
    lazy = SimpleNamespace(on_demand=True, keep_alive_s=300.0)
    assert _on_demand(lazy) == "keep-alive 5m"
    assert _on_demand(SimpleNamespace(on_demand=True, keep_alive_s=7200.0)) == "keep-alive 2h"
    assert _on_demand(SimpleNamespace(on_demand=True, keep_alive_s=2.0)) == "keep-alive 2s"
    assert _on_demand(SimpleNamespace(on_demand=False, keep_alive_s=300.0)) == "-"
    assert _status(lazy, SimpleNamespace(status="ready", loaded=True)) == "ready, loaded"
    assert _status(lazy, SimpleNamespace(status="ready", loaded=False)) == "ready, unloaded"
    assert _status(lazy, SimpleNamespace(status="scheduled", loaded=None)) == "scheduled"
