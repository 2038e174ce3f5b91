"""model-store streaming benchmark: a large safetensors file goes in and out in bounded memory.

    .venv/bin/python bench/model_store.py [--mb 300]

One process runs model-store (behind real uvicorn, in a thread) and its clients, against a real
nats-server started here. For each phase it prints the wall time, the throughput and the peak
resident set size above the baseline taken just before the phase. Peak RSS is the kernel's
VmHWM from /proc/self/status, reset before each phase by writing 5 to /proc/self/clear_refs, so
it counts every allocation of every thread (Python, C extensions, socket buffers in user space).

Phases: push (CLI client: hash + streamed HTTP upload; server: spool to disk while hashing,
header check, Object Store put), pull (CLI client: streamed HTTP download + digest check) and
fetch (the worker's fetch helper: Object Store straight into the cache, digest + signature).
The baseline to compare with is the file size: holding the file in memory once costs that much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIMIT_ABOVE_BASELINE = 100 * 1024 * 1024


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return rss()[0]


def write_safetensors(path: Path, size_mb: int) -> int:
    """One F16 tensor of ``size_mb`` MiB, written in 1 MiB blocks (never whole in memory)."""
    elements = size_mb * 1024 * 1024 // 2
    header = json.dumps({"w": {"dtype": "F16", "shape": [elements], "data_offsets": [0, elements * 2]}}).encode()
    header += b" " * (-len(header) % 8)
    block = bytes(range(256)) * 4096
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _ in range(size_mb):
            f.write(block)
    return path.stat().st_size


def write_checkpoint(directory: Path, size_mb: int) -> int:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return write_safetensors(directory / "model.safetensors", size_mb)


def measure(label: str, size: int, run) -> dict:
    base = reset_peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = rss()[1]
    above = peak - base
    row = {"phase": label, "seconds": round(seconds, 2), "MB/s": round(size / seconds / 1e6, 1),
           "baseline_rss_MB": round(base / 1e6, 1), "peak_rss_MB": round(peak / 1e6, 1),
           "peak_above_baseline_MB": round(above / 1e6, 1), "ok": above < LIMIT_ABOVE_BASELINE}
    print(f"{label:<6} {seconds:6.2f}s {row['MB/s']:7.1f} MB/s   peak RSS {row['peak_rss_MB']:7.1f} MB = baseline "
          f"{row['baseline_rss_MB']:6.1f} MB + {row['peak_above_baseline_MB']:6.1f} MB   "
          f"({'under' if row['ok'] else 'OVER'} the 100 MB budget; the file is {size / 1e6:.0f} MB)", flush=True)
    return {**row, "result": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="size of the safetensors file in MiB")
    args = parser.parse_args(argv)

    import os

    os.environ["STRATA_MODEL_STORE_BUILTIN"] = "0"
    from services.model_store.api import StoreClient
    from shared.model_fetch import fetch_model
    from tests.model_store.conftest import LiveStore
    from tests.support.nats import NatsServer

    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "nats").mkdir()
        nats_server = NatsServer(tmp_path / "nats").start()
        try:
            checkpoint = tmp_path / "ckpt"
            size = write_checkpoint(checkpoint, args.mb)
            with LiveStore(nats_server.url, tmp_path / "data") as store:
                client = StoreClient(store.url, timeout=600)
                print(
                    f"model-store streaming benchmark: {size / 1e6:.0f} MB safetensors file, peak RSS = VmHWM",
                    flush=True,
                )
                rows = [measure("push", size, lambda: client.push_model(checkpoint, "big"))]
                rows.append(measure("pull", size, lambda: client.pull("big:1", tmp_path / "pulled")))

                async def fetch() -> Path:
                    import nats

                    nc = await nats.connect(nats_server.url)
                    try:
                        return (await fetch_model(nc, "big:1", tmp_path / "cache")).path
                    finally:
                        await nc.close()

                rows.append(measure("fetch", size, lambda: asyncio.run(fetch())))
                pulled = tmp_path / "pulled" / "model.safetensors"
                assert pulled.stat().st_size == (checkpoint / "model.safetensors").stat().st_size
                client.close()
        finally:
            nats_server.stop()
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
