"""Model load: deploy-scheduled → deploy-ready for a ~1 GB checkpoint, split into fetch, verify, load.

    .venv/bin/python bench/load.py [--mb 1024]

Everything is real: a nats-server with JetStream, model-store (behind uvicorn) holding a random-weight
Llama checkpoint pushed with the CLI client, and an inference-worker whose ModelStoreSource fetches it
through model-store's fetch helper. The bench emits DeployScheduled (as hardware-inventory would) and
waits for DeployReady. It times, by wrapping the worker's own calls:

- fetch: ``ArtifactSource.fetch`` on a cold cache (resolve + signature, Object Store → cache file,
  sha256 computed inline while the bytes arrive, hard links into the checkpoint folder);
- load: ``Deployments._load`` (safetensors → engine, warm-up generation, memory measurement);
- verify: ``fetch_model`` again on the warm cache, which re-hashes every cached blob (a cache is only
  a cache) — this is the digest check on its own, in GB/s;

and the baseline: ``hashlib.sha256`` over an in-memory buffer on this CPU (the best a digest check can
do), plus a plain sequential read of the checkpoint file. Disk use: about 3× the checkpoint (the source
folder, the Object Store, the worker's cache), all in one temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host import loadavg  # noqa: E402

TARGET_VERIFY_GBPS = 1.0


def make_checkpoint(root: Path, mb: int) -> Path:
    """A random-weight LlamaForCausalLM in float32 of about ``mb`` MiB (layers chosen to fit)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4
    fixed = 2 * vocab * hidden * 4
    layers = max(1, round((mb * 2**20 - fixed) / per_layer))
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                   max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = root / "load-bench"
    model.save_pretrained(path, max_shard_size="10GB")
    del model
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def sha256_memory_gbps(mb: int = 256, repeat: int = 3) -> float:
    buf = os.urandom(mb * 2**20)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        hashlib.sha256(buf).hexdigest()
        best = min(best, time.perf_counter() - t0)
    return len(buf) / best / 1e9


def read_gbps(path: Path) -> float:
    t0 = time.perf_counter()
    size = 0
    with path.open("rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while n := f.readinto(buf):
            size += n
    return size / (time.perf_counter() - t0) / 1e9


async def deploy(nats_url: str, data_dir: Path, timings: dict) -> float:
    """A real inference-worker loads the pushed model: DeployScheduled → DeployReady, in seconds."""
    from services.inference_worker.api import EngineOptions, Worker, WorkerOptions, create_service
    from services.model_store.api import StoreClient  # noqa: F401  (import cost outside the timing)
    from shared.events import DeployReady, DeployScheduled
    from tests.inference_worker.conftest import connect_bus
    from tests.support.helpers import settings_for

    settings = settings_for("inference-worker", nats_url, data_dir, "load-node")
    service = create_service(settings, options=WorkerOptions(engine=EngineOptions(default_kv_cache_bytes=64 << 20)))
    bus = await connect_bus(nats_url, "load-node")
    try:
        async with service.running():
            deps = service.part(Worker).deployments
            fetch, load = deps.artifacts.fetch, deps._load

            async def timed_fetch(model, ref):
                t0 = time.perf_counter()
                try:
                    return await fetch(model, ref)
                finally:
                    timings["fetch_s"] = time.perf_counter() - t0

            def timed_load(artifact, event):
                t0 = time.perf_counter()
                try:
                    return load(artifact, event)
                finally:
                    timings["load_s"] = time.perf_counter() - t0

            deps.artifacts.fetch, deps._load = timed_fetch, timed_load
            model = timings["model"]
            t0 = time.perf_counter()
            await bus.emit(DeployScheduled(deployment_id="load-bench", model=model, node_id="load-node", device="cpu",
                                           predicted_bytes=1, context_length=2048, model_ref=model.name,
                                           kv_cache_bytes=64 << 20, dtype="float32"))
            await bus.wait(DeployReady, timeout=900, deployment_id="load-bench")
            return time.perf_counter() - t0
    finally:
        await bus.nc.close()


async def warm_fetch(nats_url: str, cache: Path) -> float:
    import nats

    from shared.model_fetch import fetch_model

    nc = await nats.connect(nats_url)
    try:
        t0 = time.perf_counter()
        await fetch_model(nc, "load-bench:1", cache)
        return time.perf_counter() - t0
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="checkpoint size in MiB (about)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    os.environ["STRATA_MODEL_STORE_BUILTIN"] = "0"
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from services.model_store.api import StoreClient
    from tests.model_store.conftest import LiveStore
    from tests.support.nats import NatsServer

    print(
        f"model load: python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load {loadavg()}",
        flush=True,
    )
    out: dict = {"sha256_memory_GBps": sha256_memory_gbps()}
    print(f"hashlib.sha256 in memory (baseline): {out['sha256_memory_GBps']:.2f} GB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="strata-bench-load-", dir=os.environ.get("STRATA_BENCH_TMP")) as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "nats").mkdir()
        t0 = time.perf_counter()
        ckpt = make_checkpoint(tmp_path, args.mb)
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        out["checkpoint_bytes"] = size
        print(
            f"checkpoint: {size / 1e9:.2f} GB in {sorted(f.name for f in ckpt.iterdir())} "
            f"(made in {time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        weights = max(ckpt.glob("*.safetensors"), key=lambda f: f.stat().st_size)
        out["file_read_GBps"] = read_gbps(weights)
        print(f"sequential read of the weights file (page cache): {out['file_read_GBps']:.2f} GB/s", flush=True)
        nats_server = NatsServer(tmp_path / "nats").start()
        try:
            with LiveStore(nats_server.url, tmp_path / "store") as store:
                client = StoreClient(store.url, timeout=900)
                t0 = time.perf_counter()
                pushed = client.push_model(ckpt, "load-bench")
                client.close()
                print(f"push (not part of the deploy): {time.perf_counter() - t0:.1f}s", flush=True)
                out["model"] = pushed.model if hasattr(pushed, "model") else pushed
                timings: dict = {"model": out["model"]}
                worker_dir = tmp_path / "worker"
                print(f"deploy: load {loadavg()}", flush=True)
                total = asyncio.run(deploy(nats_server.url, worker_dir, timings))
                cache = worker_dir / "inference-worker" / "cache"
                if not cache.exists():  # the service folder's name: find the cache the worker used
                    cache = next(p for p in worker_dir.rglob("cache") if (p / "blobs").is_dir())
                verify_s = warm_fetch_s = asyncio.run(warm_fetch(nats_server.url, cache))
        finally:
            nats_server.stop()
    verify_gbps = size / verify_s / 1e9
    out.update(
        deploy_total_s=total,
        fetch_s=timings["fetch_s"],
        load_s=timings["load_s"],
        verify_s=warm_fetch_s,
        verify_GBps=verify_gbps,
        fetch_GBps=size / timings["fetch_s"] / 1e9,
        load_after=loadavg(),
    )
    other = total - timings["fetch_s"] - timings["load_s"]
    print(
        f"\n| phase | seconds | GB/s | baseline |\n|---|---|---|---|\n"
        f"| deploy-scheduled → deploy-ready | {total:.2f} | | |\n"
        f"| fetch (Object Store → cache, sha256 inline) | {timings['fetch_s']:.2f} | {out['fetch_GBps']:.2f} | |\n"
        f"| load (safetensors → engine, warm-up, measure) | {timings['load_s']:.2f} | | |\n"
        f"| events, queueing, the rest | {other:.2f} | | |\n"
        f"| verify (warm-cache fetch: re-hash of every blob + signature) | {verify_s:.2f} | {verify_gbps:.2f} | "
        f"sha256 in memory {out['sha256_memory_GBps']:.2f} GB/s ({verify_gbps / out['sha256_memory_GBps']:.2f}x) |",
        flush=True,
    )
    print(
        f"\ndigest check {verify_gbps:.2f} GB/s: target ≥ {TARGET_VERIFY_GBPS} GB/s "
        f"{'met' if verify_gbps >= TARGET_VERIFY_GBPS else 'NOT met'}; load {loadavg()}"
    )
    if args.json:
        out["model"] = str(out["model"])
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
