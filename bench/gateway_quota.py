"""What holding a key to its quotas costs the api-gateway per request: reserve at admission and settle
at the end (service_layer/metering.py) against the shared counters in JetStream KV
(adapters/quota_counters.py, a nats-server started here on loopback), next to the same work on
in-memory counters (the rules alone, no round trip) in the same run.

Figures per request: wall time (elapsed over requests: one at a time, the latency added; at once,
the throughput cost) and this process's CPU (the gateway's side; nats-server's is not counted), one
request at a time, and ``--concurrency`` requests at once on one key (compare-and-set conflicts: the
worst case) and on as many keys (the usual case).

    .venv/bin/python bench/gateway_quota.py            # ~15 s
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402

from services.api_gateway.api import InMemoryQuotaCounters, KvQuotaCounters, Metering, QuotaCounters  # noqa: E402
from shared.apikeys import ApiKeyRecord, record_for  # noqa: E402
from shared.inference import InferenceRequest, SamplingOptions  # noqa: E402
from tests.support.nats import NatsServer  # noqa: E402

PROMPT = "hello there, " * 8


async def one(metering: Metering, key: ApiKeyRecord, i: int) -> None:
    request = InferenceRequest(request_id=f"r{i}", model="echo", prompt=PROMPT, sampling=SamplingOptions(max_tokens=16))
    _, hold = await metering.reserve(key, request)
    await metering.settle(hold, 20)


async def run(counters: QuotaCounters, keys: list[ApiKeyRecord], n: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per request, ``len(keys)`` requests at a time (one per key, or all
    on one key when the list repeats it)."""
    metering = Metering(max_tokens_cap=4096)
    metering.counters = counters
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in range(n // len(keys)):
        await asyncio.gather(*(one(metering, key, batch * len(keys) + j) for j, key in enumerate(keys)))
    done = (n // len(keys)) * len(keys)
    return (time.perf_counter() - wall) / done * 1e3, (time.process_time() - cpu) / done * 1e3


async def main_async(args: argparse.Namespace) -> None:
    limits = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}
    one_key = record_for("sk-bench-0", "bench", **limits)
    many = [record_for(f"sk-bench-{i}", "bench", **limits) for i in range(args.concurrency)]
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp)).start()
        try:
            nc = await nats.connect(server.url)
            kv = await KvQuotaCounters.open(nc.jetstream(), create=True)
            shapes = {"1 at a time": [one_key], f"{args.concurrency} at once, one key": [one_key] * args.concurrency,
                      f"{args.concurrency} at once, {args.concurrency} keys": many}
            await run(kv, [one_key], 200)  # warm-up
            print(
                f"{'':<28} {'in-memory (rules only)':>24} {'JetStream KV (shared)':>24}"
                "  per request: wall / gateway CPU"
            )
            for name, keys in shapes.items():
                local = await run(InMemoryQuotaCounters(), keys, args.requests)
                before = kv.conflicts
                shared = await run(kv, keys, args.requests)
                print(
                    f"{name:<28} {local[0]:>8.3f} / {local[1]:.3f} ms     {shared[0]:>8.3f} / {shared[1]:.3f} ms  "
                    f"(+{shared[0] - local[0]:.3f} ms wall, +{shared[1] - local[1]:.3f} ms CPU; "
                    f"{(kv.conflicts - before) / args.requests:.2f} CAS retries per request)"
                )
            await nc.close()
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
