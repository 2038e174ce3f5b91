"""`strata top` reads the monitor's HTTP API and draws the same data in the terminal."""

from __future__ import annotations

import asyncio

from cli import main as cli_main
from cli.natsd import free_port
from tests.monitor.conftest import Running, until
from tests.monitor.script import scripted_run


async def test_strata_top_once_shows_nodes_deployments_models_alerts_and_the_ledger(
    running: Running, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "160")  # rich would squeeze the tables into pytest's 80 columns
    await scripted_run(running.publisher)
    await until(
        lambda: running.monitor.state.ledger.tree_size == 57 and running.monitor.state.traffic.count() == 31, "the run"
    )
    await until(lambda: running.monitor.alerts.firing(), "an alert")
    # the CLI is synchronous: run it in a thread while this loop keeps serving the monitor
    code = await asyncio.to_thread(cli_main.main, ["top", "--url", running.url, "--once"])
    out = capsys.readouterr().out
    assert code == 0
    for expected in (
        "gpu-1",
        "cuda:0 NVIDIA H100",
        "tiny",
        "broken",
        "failed",
        "ready",
        "deploy_failed",
        "signature does not verify",
        "tree size 57",
        "model-store: 1",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_strata_top_says_clearly_when_the_monitor_is_not_there(capsys):
    code = cli_main.main(["top", "--url", f"http://127.0.0.1:{free_port()}", "--once"])
    assert code == 1
    assert "did not answer" in capsys.readouterr().err
