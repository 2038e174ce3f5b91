"""The summary plugin itself: a case's line reaches the end of the session through xdist workers,
and a failing case's line still shows, marked with the failure."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.faults.support import ROOT

CASES = '''
def test_passes(fault_summary):
    fault_summary("demo-ok", sent=3, answered=3, errored=0, lost=0)

def test_fails(fault_summary):
    fault_summary("demo-bad", sent=3, answered=1, errored=1, lost=1)
    assert False, "one was lost"
'''


def test_lines_reach_the_terminal_summary_from_xdist_workers_even_when_a_case_fails(tmp_path):
    (tmp_path / "test_demo.py").write_text(CASES)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "-p",
            "tests.faults.summary",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr  # one case failed
    summary = run.stdout.split("fault suite", 1)[1]
    assert "fault=demo-ok sent=3 answered=3 errored=0 lost=0\n" in summary
    assert "fault=demo-bad sent=3 answered=1 errored=1 lost=1  [FAILED: test_demo.py::test_fails]" in summary
