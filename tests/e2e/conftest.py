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


@pytest.fixture(scope="module")
def bare_platform(tmp_path_factory):
    """A real `strata up` without the built-in model, up before the module's first test, one per module."""
    up = Up(tmp_path_factory.mktemp("platform") / "data", "--no-builtin")
    try:
        up.wait_for("Strata is up", timeout=90)
        yield up
    finally:
        up.stop()
