"""The `strata` command's own dispatch (each area's commands are tested with their service)."""

import subprocess
import sys


def test_train_passes_its_options_to_the_trainer_and_reports_bad_ones():
    result = subprocess.run([sys.executable, "-m", "cli.main", "train", "--steps", "0", "--out", "/nonexistent/x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "steps must be a positive number, got 0" in result.stderr


def test_unknown_commands_are_refused_with_the_list():
    result = subprocess.run([sys.executable, "-m", "cli.main", "launch"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'launch'" in result.stderr
