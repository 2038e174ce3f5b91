"""Fault: kill -9 the provenance-ledger process mid-ingest and start it again. The ledger's tree
holds every event of the EVENTS stream exactly once (its size equals the stream's message count),
and `strata ledger verify` passes, over RPC on the running ledger and on its files afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from cli import main as cli_main
from cli.natsd import free_port
from services.provenance_ledger.service_layer.ledger import DB_FILE
from shared import rpc, subjects
from shared.provenance import Empty, HeadResponse
from shared.service import Service
from tests.faults.support import ROOT, PublishTally, completed_event, stop_process
from tests.support.helpers import settings_for

pytestmark = pytest.mark.timeout(180)

SENT = 500
KILL_AT = 100  # leaves logged when the kill comes; the rest arrive while it is down or after


def start_ledger(nats_url: str, data_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "STRATA_NATS_URL": nats_url, "STRATA_DATA_DIR": str(data_dir), "STRATA_NODE_ID": "node-l",
           "STRATA_PROVENANCE_LEDGER_PORT": str(free_port()), "STRATA_LEDGER_CHECKPOINT_SECONDS": "0.5",
           # what the killed ledger had fetched but not acknowledged comes back after this, not after 30 s
           "STRATA_LEDGER_ACK_WAIT_SECONDS": "3"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "provenance-ledger"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("ab"), stdin=subprocess.DEVNULL)


def logged_ids(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT event_id FROM leaves WHERE type = 'inference.completed'")]
    finally:
        con.close()


async def test_kill_9_the_ledger_mid_ingest_and_restart(nats_server, tmp_path, fault_summary):
    data_dir, log = tmp_path / "data", tmp_path / "ledger.log"
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    sizes: list[int] = []

    async def poll_head() -> None:
        try:
            head = await rpc.call(nc, subjects.rpc("provenance-ledger", "head"), Empty(), HeadResponse, timeout=2)
        except Exception:  # starting, killed or restarting: no answer this time
            return
        sizes.append(head.tree_size)

    async def head_at_least(n: int, timeout: float, what: str) -> None:
        async def poll() -> None:
            while not sizes or sizes[-1] < n:
                await poll_head()
                await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; sizes seen {sizes[-3:]}\n"
                                 + log.read_text()[-3000:]) from None

    publisher = Service("fault-publisher", settings_for("fault-publisher", nats_server.url, tmp_path / "publisher"))
    tally = PublishTally()
    events = [completed_event(i, "ledger-kill") for i in range(SENT)]
    proc = start_ledger(nats_server.url, data_dir, log)
    try:
        async with publisher.running():
            await head_at_least(0, 60, "the ledger answering")

            async def publish_all() -> None:
                for event in events:
                    await tally.publish(publisher, event)
                    await asyncio.sleep(0.002)

            publishing = asyncio.create_task(publish_all())
            await head_at_least(KILL_AT, 60, f"{KILL_AT} leaves logged")
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            at_kill = len(logged_ids(data_dir / "provenance-ledger" / DB_FILE))
            await publishing
            proc = start_ledger(nats_server.url, data_dir, log)

            async def caught_up() -> bool:
                await poll_head()
                stream = await js.stream_info(subjects.EVENTS_STREAM)
                return bool(sizes) and sizes[-1] == stream.state.messages

            async def settled() -> None:
                while not await caught_up():
                    await asyncio.sleep(0.1)
            await asyncio.wait_for(settled(), 60)
            await asyncio.sleep(1.5)  # redeliveries of what was unacked at the kill: none may append a leaf
            stream_messages = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
            await poll_head()
            tree_size = sizes[-1]
            verify_rpc = await asyncio.to_thread(cli_main.main, ["ledger", "verify", "--nats-url", nats_server.url])
        stop_process(proc)
        verify_files = await asyncio.to_thread(cli_main.main, ["ledger", "verify", "--data-dir", str(data_dir)])
        ids = logged_ids(data_dir / "provenance-ledger" / DB_FILE)
        published = {e.id for e in events}
        lost = len(set(tally.acked) - set(ids))
        fault_summary("ledger-kill", sent=SENT, answered=len(tally.acked), errored=len(tally.failed), lost=lost,
                      logged_at_kill=at_kill, tree_size=tree_size, stream_messages=stream_messages,
                      duplicated=len(ids) - len(set(ids)))
        assert 0 < at_kill < SENT, f"the kill should land mid-ingest (logged {at_kill} of {SENT})"
        assert lost == 0 and len(ids) == len(set(ids)) and set(ids) <= published
        assert tally.failed == [] and set(ids) == published
        assert tree_size == stream_messages
        assert verify_rpc == 0 and verify_files == 0
    finally:
        stop_process(proc)
        await nc.close()
