"""A real `strata up` (every service, the built-in model deployed) on free ports, for the e2e tests."""

from __future__ import annotations

import pytest

from tests.support.up import Up


@pytest.fixture
def platform(tmp_path):
    up = Up(tmp_path / "data")
    try:
        yield up
    finally:
        up.stop()
