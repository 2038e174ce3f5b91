"""shared/config.py's env_value: the one reading of a service's own setting (the ledger's and the worker's)."""

from __future__ import annotations

import pytest

from shared.config import env_value


def test_a_setting_unset_or_empty_is_its_default_and_otherwise_read_by_its_cast():
    assert env_value({}, "STRATA_X", 7, int) == 7
    assert env_value({"STRATA_X": ""}, "STRATA_X", 7, int) == 7
    assert env_value({"STRATA_X": "3"}, "STRATA_X", 7, int) == 3


def test_a_value_its_cast_refuses_is_refused_naming_the_variable_and_the_value():
    def positive(text: str) -> float:
        if float(text) <= 0:
            raise ValueError("must be more than 0")
        return float(text)

    with pytest.raises(ValueError, match=r"^STRATA_X='soon': could not convert"):
        env_value({"STRATA_X": "soon"}, "STRATA_X", 1.0, positive)
    with pytest.raises(ValueError, match=r"^STRATA_X='-1': must be more than 0$"):
        env_value({"STRATA_X": "-1"}, "STRATA_X", 1.0, positive)
