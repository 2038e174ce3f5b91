"""`strata complete` and `strata chat` over NATS against a scripted worker (the CLI runs in a thread:
it has its own event loop, the worker lives in the test's)."""

from __future__ import annotations

import asyncio
import io

import pytest

from cli.main import main
from tests.support.fake_worker import Script

pytestmark = pytest.mark.timeout(60)


async def run_cli(argv: list[str]) -> int:
    return await asyncio.to_thread(main, argv)


@pytest.mark.parametrize("stream_flag", ["--stream", "--no-stream"])
async def test_complete(nats_server, workers, capsys, stream_flag):
    worker = await workers()
    code = await run_cli(["complete", "tiny", "Say hello", "--max-tokens", "3", "--temperature", "0", "--seed", "4",
                          stream_flag, "--nats-url", nats_server.url])
    assert code == 0
    assert capsys.readouterr().out == "Hello, world\n"
    sent = worker.requests[-1]
    assert sent.prompt == "Say hello"
    # --no-stream: one reply, with keepalives before it (a dead worker is still noticed in seconds)
    assert (sent.stream, sent.keepalive) == ((True, False) if stream_flag == "--stream" else (False, True))
    assert (sent.sampling.max_tokens, sent.sampling.temperature, sent.sampling.seed) == (3, 0, 4)


async def test_complete_failures_are_clear(nats_server, workers, capsys):
    await workers()
    assert await run_cli(["complete", "absent", "x", "--nats-url", nats_server.url]) == 1
    assert "'absent' is not deployed" in capsys.readouterr().err
    assert await run_cli(["complete", "tiny", "x", "--temperature", "9", "--nats-url", nats_server.url]) == 2
    assert "temperature" in capsys.readouterr().err


async def test_chat_keeps_the_history(nats_server, workers, capsys, monkeypatch):
    worker = await workers()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nagain\n/exit\n"))
    code = await run_cli(["chat", "tiny", "--system", "be kind", "--nats-url", nats_server.url])
    assert code == 0
    assert capsys.readouterr().out.count("Hello, world!") == 2
    assert [(m.role, m.content) for m in worker.requests[-1].messages] == [
        ("system", "be kind"), ("user", "hi"), ("assistant", "Hello, world!"), ("user", "again"),
    ]


async def test_chat_reports_a_worker_error_and_goes_on(nats_server, workers, capsys, monkeypatch):
    await workers({"tiny": Script(overloaded=True)})
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))  # then end of input
    assert await run_cli(["chat", "tiny", "--nats-url", nats_server.url]) == 0
    assert "queue is full" in capsys.readouterr().err


async def test_ctrl_c_in_chat_stops_the_answer_and_cancels_it(nats_server, workers):
    import os
    import signal
    import sys

    from tests.support.helpers import eventually

    worker = await workers({"tiny": Script(delay_s=0.1, tokens=["t"] * 300)})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "chat", "tiny", "--nats-url", nats_server.url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a terminal's foreground program gets Ctrl-C; a test run started in the background (`cmd &` in a
        # script) passes SIGINT down ignored, and the chat would never see it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        proc.stdin.write(b"hi\n")
        await proc.stdin.drain()
        seen = b""
        while b"tt" not in seen:  # the answer is streaming
            seen += await asyncio.wait_for(proc.stdout.read(64), 20)
        proc.send_signal(signal.SIGINT)
        await eventually(lambda: len(worker.cancels) == 1, 10, "InferenceCancel after Ctrl-C")
        assert worker.cancels[0].request_id == worker.requests[0].request_id
        proc.stdin.write(b"/exit\n")
        await proc.stdin.drain()
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        assert b"[answer stopped]" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
