"""Platform overhead on CPU: an echo model through HTTP → api-gateway → NATS → inference-worker →
NATS → api-gateway → HTTP, against calling the same model in-process.

Every process is the real one, as ``strata up`` runs it: a real nats-server with JetStream, the
api-gateway (``strata serve api-gateway`` under uvicorn) and the inference-worker's real serving code
(``create_service``, the deploy flow, ``Server``, ``EngineLoop``) with one thing swapped through the
``Deployments._load`` seam: the engine is ``EchoEngine``, which answers every request with its prompt
in one step. Phase 2 adds the provenance-ledger and the monitor, which consume every event.

Figures: p50/p99 of sequential requests (low load) through the gateway, minus the same percentile
of the in-process call (``Server.complete`` on the same EchoEngine behind the same EngineLoop);
requests/s through the gateway at ``--concurrency`` clients. The load generator shares the machine's
cores with everything it measures (say so when you quote the figures).

    .venv/bin/python bench/platform_overhead.py                     # ~1-2 minutes
    .venv/bin/python bench/platform_overhead.py --profile DIR       # cProfile of every service process into DIR
    .venv/bin/python bench/platform_overhead.py --py-spy DIR        # py-spy samples of each during the throughput runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.echo_worker import MODEL, echo_load, echo_model  # noqa: E402
from bench.host import loadavg  # noqa: E402

TARGETS = {"p50_added_ms": 1.0, "p99_added_ms": 5.0, "rps": 2000.0}


# ---- the in-process baseline ---------------------------------------------------------------------
async def in_process(n: int) -> list[float]:
    """The same echo model behind the same Server.complete, no NATS and no HTTP."""
    from services.inference_worker.api import Deployment, Deployments, Server
    from shared.inference import InferenceRequest

    async def publish(_data) -> None:
        return None

    deps = Deployments("bench", None, publish, None)  # type: ignore[arg-type]
    loop, _ = echo_load(type("A", (), {"model": echo_model()})(), None)
    deps.by_key["d/0"] = Deployment(key="d/0", deployment_id="d", replica=0, generation=1, model=echo_model(),
                                    device="cpu", state="ready", loop=loop.start())
    server = Server(deps, "bench", publish)
    out = []
    for i in range(n):
        request = InferenceRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                   sampling={"max_tokens": 1})
        t0 = time.perf_counter()
        await server.complete(request)
        out.append(time.perf_counter() - t0)
    loop.stop()
    return out


# ---- helpers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def spawn(argv: list[str], env: dict[str, str], log: Path, profile: Path | None) -> subprocess.Popen:
    prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
    return subprocess.Popen(prefix + argv, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        # SIGINT: uvicorn shuts down on it, then re-raises it as KeyboardInterrupt, which still lets
        # cProfile write its file (after a re-raised SIGTERM it would write nothing)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


API_KEY = "sk-strata-platform-overhead-bench"  # registered through STRATA_API_KEYS unless --open
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


class RawClient:
    """A lean HTTP/1.1 keep-alive client (asyncio streams, one connection per concurrent caller),
    so that the load generator spends little of the CPU it shares with what it measures: httpx
    costs ~3.5 ms of CPU per request here, more than the gateway itself. Same body as httpx sends."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        from urllib.parse import urlparse

        u = urlparse(url)
        self.host, self.port = u.hostname, u.port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, url: str, json: dict) -> "RawResponse":
        import json as _json
        from urllib.parse import urlparse

        body = _json.dumps(json).encode()
        head = (f"POST {urlparse(url).path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                f"{self.headers}content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        writer.write(head + body)
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        content = await reader.readexactly(length)
        self._idle.append((reader, writer))
        return RawResponse(int(status_line.split()[1]), content)

    async def __aenter__(self) -> "RawClient":
        return self

    async def __aexit__(self, *exc) -> None:
        for _, writer in self._idle:
            writer.close()


class RawResponse:
    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code, self.content = status_code, content

    def raise_for_status(self) -> None:
        if self.status_code != 200:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:200]!r}")


async def wait_ready(client, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = await client.post(f"{url}/v1/chat/completions", json=BODY)
            if r.status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the echo model did not become servable through the gateway")


async def sequential(client, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post(f"{url}/v1/chat/completions", json=BODY)
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
    return out


async def throughput(client, url: str, concurrency: int, seconds: float, max_requests: int) -> tuple[float, int, int]:
    done = errors = 0
    end = time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal done, errors
        while time.perf_counter() < end and done + errors < max_requests:
            r = await client.post(f"{url}/v1/chat/completions", json=BODY)
            if r.status_code == 200:
                done += 1
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0), done, errors


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy(folder: str, phase: str, pids: dict[str, int], seconds: float) -> list[subprocess.Popen]:
    """Sample every service process (not nats-server) during the throughput run: py-spy's raw folded
    stacks, one file per process (``<phase>-<process>.txt``), 400 samples a second. Far less skew than
    cProfile; py-spy must be installed (``pip install py-spy``) and allowed to read other processes."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in phase).strip("-")
    return [
        subprocess.Popen(
            [
                exe,
                "record",
                "--rate",
                "400",
                "--duration",
                str(max(1, int(seconds) - 1)),
                "--format",
                "raw",
                "--output",
                str(out / f"{tag}-{name}.txt"),
                "--pid",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
        if name != "nats-server"
    ]


async def measure(url: str, args, label: str, base: dict, pids: dict[str, int]) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    headers = {} if args.open else {"authorization": f"Bearer {API_KEY}"}
    client_cm = (
        RawClient(url, headers)
        if args.client == "raw"
        else httpx.AsyncClient(limits=limits, timeout=30, headers=headers)
    )
    async with client_cm as client:
        await wait_ready(client, url)
        await sequential(client, url, args.warmup)
        load_before = loadavg()
        lat = await sequential(client, url, args.requests)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client0 = time.process_time()
        samplers = py_spy(args.py_spy, label, pids, args.seconds) if args.py_spy else []
        rps, done, errors = await throughput(client, url, args.concurrency, args.seconds, args.max_requests)
        for sampler in samplers:
            sampler.wait()
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) / max(done, 1) * 1e3 for name, pid in pids.items()}
        cpu["load generator"] = (time.process_time() - client0) / max(done, 1) * 1e3
    p50, p99 = pct(lat, 50) * 1e3, pct(lat, 99) * 1e3
    row = {
        "phase": label,
        "client": args.client,
        "p50_ms": p50,
        "p99_ms": p99,
        "p50_added_ms": p50 - base["p50_ms"],
        "p99_added_ms": p99 - base["p99_ms"],
        "rps": rps,
        "requests": done,
        "errors": errors,
        "concurrency": args.concurrency,
        "load_before": load_before,
        "load_after": loadavg(),
        "cpu_ms_per_request": cpu,
    }
    print(
        f"{label:<28} p50 {p50:7.2f} ms (+{row['p50_added_ms']:.2f})  p99 {p99:7.2f} ms (+{row['p99_added_ms']:.2f})  "
        f"{rps:7.0f} req/s at c={args.concurrency} ({done} ok, {errors} failed)  load {row['load_after']}",
        flush=True,
    )
    print(
        f"{'':<28} CPU ms per request: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        + f" (sum {sum(cpu.values()):.2f})",
        flush=True,
    )
    return row


async def main_async(args) -> list[dict]:
    from tests.support.nats import NatsServer

    rows = []
    base_lat = await in_process(args.warmup + args.requests)
    base_lat = base_lat[args.warmup :]
    base = {"p50_ms": pct(base_lat, 50) * 1e3, "p99_ms": pct(base_lat, 99) * 1e3}
    print(
        f"{'in-process Server.complete':<28} p50 {base['p50_ms']:7.3f} ms  p99 {base['p99_ms']:7.3f} ms  "
        f"mean {statistics.mean(base_lat) * 1e3:.3f} ms  load {loadavg()}",
        flush=True,
    )
    rows.append({"phase": "in-process baseline", **base})

    with tempfile.TemporaryDirectory(prefix="strata-bench-platform-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "nats").mkdir()
        nats = NatsServer(tmpdir / "nats").start()
        procs: list[subprocess.Popen] = []
        prof = Path(args.profile) if args.profile else None
        if prof:
            prof.mkdir(parents=True, exist_ok=True)
        try:
            gw_port = free_port()
            env = {
                **os.environ,
                "STRATA_NATS_URL": nats.url,
                "STRATA_DATA_DIR": str(tmpdir / "data"),
                "STRATA_NODE_ID": "bench-node",
                "STRATA_API_GATEWAY_PORT": str(gw_port),
                "STRATA_API_GATEWAY_MAX_IN_FLIGHT": str(max(256, args.concurrency * 2)),
                "STRATA_INFERENCE_WORKER_PORT": str(free_port()),
                "STRATA_MONITOR_PORT": str(free_port()),
                "STRATA_PROVENANCE_LEDGER_PORT": str(free_port()),
                "PYTHONPATH": str(ROOT),
                **({} if args.open else {"STRATA_API_KEYS": API_KEY}),
            }
            procs.append(
                spawn(
                    [str(ROOT / "bench" / "echo_worker.py")],
                    env,
                    tmpdir / "worker.log",
                    prof / "worker.prof" if prof else None,
                )
            )
            procs.append(
                spawn(
                    ["-m", "cli.main", "serve", "api-gateway"],
                    env,
                    tmpdir / "gateway.log",
                    prof / "gateway.prof" if prof else None,
                )
            )
            url = f"http://127.0.0.1:{gw_port}"
            pids = {"nats-server": nats.process.pid, "worker": procs[0].pid, "gateway": procs[1].pid}
            rows.append(await measure(url, args, "gateway→NATS→worker", base, pids))
            if not args.skip_consumers:
                for name in ("provenance-ledger", "monitor"):
                    procs.append(
                        spawn(
                            ["-m", "cli.main", "serve", name],
                            env,
                            tmpdir / f"{name}.log",
                            prof / f"{name}.prof" if prof else None,
                        )
                    )
                    pids[name] = procs[-1].pid
                await asyncio.sleep(args.settle)  # they start and catch up on the events so far
                rows.append(await measure(url, args, "+ ledger + monitor", base, pids))
        finally:
            for p in reversed(procs):
                stop(p)
            nats.stop()
            for p in procs:
                if p.returncode not in (0, 1, -signal.SIGINT, -signal.SIGTERM):
                    print(f"note: a process exited with {p.returncode}; its log was in {tmpdir}", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="sequential requests per phase (p50/p99)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of the throughput run")
    ap.add_argument("--max-requests", type=int, default=50_000)
    ap.add_argument("--settle", type=float, default=8.0, help="seconds for ledger and monitor to start")
    ap.add_argument("--skip-consumers", action="store_true", help="no ledger/monitor phase")
    ap.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: a lean asyncio HTTP/1.1 client (default) or httpx.AsyncClient",
    )
    ap.add_argument(
        "--open",
        action="store_true",
        help="no API key (the gateway's open mode); by default every request carries a key, as under strata up",
    )
    ap.add_argument(
        "--profile",
        help="write cProfile output of each service process (gateway, worker, ledger, monitor) into this folder",
    )
    ap.add_argument(
        "--py-spy", metavar="DIR", help="sample each service process with py-spy during the throughput runs, into DIR"
    )
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    print(
        f"platform overhead: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, client {args.client}, "
        f"{'open (no API key)' if args.open else 'an API key on every request'}, "
        f"load {loadavg()}",
        flush=True,
    )
    rows = asyncio.run(main_async(args))
    for row in rows[1:]:
        met = [k for k, target in TARGETS.items() if (row[k] >= target if k == "rps" else row[k] <= target)]
        print(f"{row['phase']}: targets met: {', '.join(met) or 'none'} (targets {TARGETS})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
