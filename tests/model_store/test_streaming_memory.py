"""A 300 MiB safetensors file is pushed, pulled and fetched while the process stays under 100 MB
above its baseline (peak RSS = the kernel's VmHWM, reset before each phase). ~15 s here;
bench/model_store.py prints the same figures with throughput."""

from __future__ import annotations

import asyncio
import filecmp
from pathlib import Path

import nats
import pytest

from bench.model_store import LIMIT_ABOVE_BASELINE, reset_peak, rss, write_checkpoint
from services.model_store.client import StoreClient
from shared.model_fetch import fetch_model

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
)


def peak_above_baseline(run) -> int:
    base = reset_peak()
    run()
    return rss()[1] - base


def test_300_mb_file_goes_in_and_out_in_bounded_memory(live_store, tmp_path):
    checkpoint = tmp_path / "ckpt"
    size = write_checkpoint(checkpoint, 300)
    client = StoreClient(live_store.url, timeout=300)
    try:
        pushed = peak_above_baseline(lambda: client.push_model(checkpoint, "big"))
        pulled = peak_above_baseline(lambda: client.pull("big:1", tmp_path / "pulled"))
    finally:
        client.close()

    async def fetch() -> None:
        nc = await nats.connect(live_store.nats_url)
        try:
            await fetch_model(nc, "big:1", tmp_path / "cache")
        finally:
            await nc.close()

    fetched = peak_above_baseline(lambda: asyncio.run(fetch()))
    for copy in (
        tmp_path / "pulled" / "model.safetensors",
        next((tmp_path / "cache" / "models" / "big").iterdir()) / "model.safetensors",
    ):
        assert filecmp.cmp(copy, checkpoint / "model.safetensors", shallow=False) and copy.stat().st_size == size
    for phase, above in (("push", pushed), ("pull", pulled), ("fetch", fetched)):
        assert above < LIMIT_ABOVE_BASELINE, (
            f"{phase}: peak RSS {above / 1e6:.0f} MB above baseline for a {size / 1e6:.0f} MB file"
        )
