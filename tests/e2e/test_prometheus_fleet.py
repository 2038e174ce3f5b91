"""#21's done-when: a Prometheus from Debian's package scrapes all six services of a real `strata up`
(the monitor as infra/prometheus's strata-monitor job, the five others as strata-services, with
infra/prometheus's rules) and shows the worker's live gauges change under load: requests running
and KV-cache use above zero while requests stream, back to zero after."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from cli.natsd import free_port
from shared.config import SERVICES
from tests.support.up import Up

ROOT = Path(__file__).resolve().parents[2]
MODEL = "strata-builtin-kjv"
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus missing: .ci/run installs Debian's prometheus package")]


@pytest.fixture
def platform(tmp_path):
    up = Up(tmp_path / "data")
    try:
        up.wait_for("Strata is up", timeout=90)
        up.wait_for(f"built-in model {MODEL} is serving", timeout=150)
        yield up
    finally:
        up.stop()


@pytest.fixture
def prometheus(platform, tmp_path):
    """infra/prometheus's config and rules, its targets pointed at this `strata up`, 1 s intervals."""
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        names = ["monitor"] if job["job_name"] == "strata-monitor" else [s for s in SERVICES if s != "monitor"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{platform.ports[n]}"], "labels": {"service_name": n}}
                                 for n in names]
    shutil.copy(ROOT / "infra/prometheus/strata-rules.yml", tmp_path / "strata-rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def query(http: httpx.AsyncClient, api: str, expr: str) -> list[dict]:
    r = await http.get(f"{api}/query", params={"query": expr})
    r.raise_for_status()
    return r.json()["data"]["result"]


async def until(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := await check():
                return result
        except httpx.HTTPError:
            pass  # Prometheus not listening yet
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        await asyncio.sleep(0.5)


async def test_prometheus_scrapes_every_service_and_sees_the_engine_under_load(platform, prometheus):
    client = openai.AsyncOpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key,
                                max_retries=0, timeout=120)

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"And it came to pass {i}"}],
            max_tokens=64, temperature=0.8, seed=i, stream=True)
        async for _ in stream:
            pass

    async with httpx.AsyncClient(timeout=5) as http:
        async def all_up():
            up = await query(http, prometheus, "up")
            return len(up) == len(SERVICES) and all(s["value"][1] == "1" for s in up) and up

        up = await until("all six services scraped and up", all_up)
        assert {s["metric"]["service_name"] for s in up} == set(SERVICES)

        async def busy():
            running = await query(
                http, prometheus, f'max_over_time(strata:num_requests_running{{model_name="{MODEL}"}}[1m]) > 0'
            )
            kv = await query(
                http, prometheus, f'max_over_time(strata:kv_cache_usage_perc{{model_name="{MODEL}"}}[1m]) > 0'
            )
            return running and kv

        seen = None
        for wave in range(10):  # waves of 4 concurrent streams until a scrape has caught the engine busy
            await asyncio.gather(*(one(4 * wave + i) for i in range(4)))
            if seen := await busy():
                break
        assert seen, "Prometheus never saw the engine running a request"

        async def idle():
            now = await query(http, prometheus, f'strata:num_requests_running{{model_name="{MODEL}"}}')
            return now and all(float(s["value"][1]) == 0 for s in now)

        await until("the running gauge back at 0", idle, timeout=30)
        # each target is scraped on its own clock: the gateway's last scrape may predate the streams'
        # ends that the worker's already shows, so wait for the gateway's counter too
        chats = await until(
            "the gateway's counter scraped after the streams ended",
            lambda: query(
                http,
                prometheus,
                'sum(strata_http_requests_total{service="api-gateway",route="/v1/chat/completions",status="200"}) >= 4',
            ),
            timeout=30,
        )
        assert float(chats[0]["value"][1]) >= 4
        # a counter is first scraped at whatever it holds, and rate() cannot see that first step: once
        # the monitor's series is in Prometheus, one more wave makes the recording rule's rate show
        await until(
            "the monitor's request counter scraped",
            lambda: query(http, prometheus, f'strata:request_success_total{{model_name="{MODEL}"}}'),
        )
        await asyncio.sleep(1.5)  # a scrape of the counter before the next wave lands
        await asyncio.gather(*(one(100 + i) for i in range(4)))
        rate = await until(
            "the recording rule over the monitor's counters",
            lambda: query(http, prometheus, f'model_name:strata_requests:rate1m{{model_name="{MODEL}"}} > 0'),
        )
        assert rate
