"""One summary line per fault case, printed at the end of the session even under capture and xdist.

A case calls ``fault_summary("worker-kill", sent=40, answered=37, errored=3, lost=0)`` *before* its
final assertions, so a failing case still shows what it counted. The line travels as a user property
of the test's report (xdist forwards those to the controller), and ``pytest_terminal_summary`` prints
every such line. Registered from tests/conftest.py (``pytest_plugins``), so the controller loads it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

PROPERTY = "fault_summary"


def summary_line(fault: str, **counts: int) -> str:
    return " ".join([f"fault={fault}", *(f"{name}={value}" for name, value in counts.items())])


@pytest.fixture
def fault_summary(record_property) -> Callable[..., str]:
    def record(fault: str, **counts: int) -> str:
        line = summary_line(fault, **counts)
        record_property(PROPERTY, line)
        print(line)  # also in the captured output of a failing case
        return line

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001  (hook signature)
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == PROPERTY:
                    outcome = "" if report.passed else f"  [{report.outcome.upper()}: {report.nodeid}]"
                    lines.append(f"{value}{outcome}")
    if lines:
        terminalreporter.write_sep("-", "fault suite")
        for line in sorted(lines):
            terminalreporter.write_line(line)
