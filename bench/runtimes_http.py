"""The llama.cpp runtime end to end through Strata's gateway, next to llama-cpp-python's own OpenAI
server on the same GGUF file, in the same run (issue #17's HTTP rows).

    python bench/runtimes_http.py                  # 246M-parameter random Llama, Q8_0, 128 new tokens
    python bench/runtimes_http.py --hidden 256 --layers 4 --new-tokens 32 --repeat 1   # a quick look

Both are driven by the official openai client, streaming completions, greedy, eos ignored where the
server takes it (Strata: ``ignore_eos`` is not an OpenAI field, so a random model may stop early;
tokens are counted from the usage the stream ends with, or chunks). Single stream: decode tok/s =
(chunks - 1) / (last chunk - first chunk). N concurrent streams: aggregate tok/s = every stream's
chunks / wall time, and the mean time to first chunk. The two servers alternate, --repeat times, and
the load average is printed with each figure. Both use the same number of llama.cpp threads.
Needs llama-cpp-python's server extras (sse-starlette, starlette-context, pydantic-settings).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402

from bench.host import loadavg  # noqa: E402

PROMPT = "Once upon a time there was a small model that wanted to tell stories about"


def one_stream(client: openai.OpenAI, model: str, new_tokens: int) -> tuple[float, int, float]:
    """(time to first chunk, chunks, decode tok/s)."""
    start = time.perf_counter()
    stamps = []
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=new_tokens, temperature=0,
                                           stream=True):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return (stamps[0] - start if stamps else 0.0), len(stamps), rate


def concurrent(client: openai.OpenAI, model: str, new_tokens: int, n: int) -> tuple[float, float]:
    """(aggregate tok/s, mean time to first chunk) of n streams started together."""
    results: list[tuple[float, int, float]] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda: results.append(one_stream(client, model, new_tokens))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return sum(r[1] for r in results) / wall, statistics.mean(r[0] for r in results)


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--quant", default="Q8_0", choices=["F16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    import llama_cpp as C

    from bench.runtimes import quantize
    from cli import natsd
    from tests.support.gguf_model import write_random_gguf
    from tests.support.up import Up

    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = Path(tmp)
        f16 = write_random_gguf(root / "model.F16.gguf", "f16", hidden=args.hidden, layers=args.layers, heads=16,
                                kv_heads=4, intermediate=args.hidden * 11 // 4, context=1024, vocab_size=args.vocab)
        ftype = {"F16": None, "Q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K_M": C.LLAMA_FTYPE_MOSTLY_Q4_K_M}[args.quant]
        gguf_file = f16 if ftype is None else quantize(f16, root / f"model.{args.quant}.gguf", ftype, args.threads)
        os.environ["STRATA_LLAMACPP_THREADS"] = str(args.threads)
        up = Up(root / "data", "--no-builtin")
        peer = None
        try:
            up.wait_for("Strata is up", timeout=120)
            for cmd in (("model", "push", str(gguf_file), "--name", "bench-gguf"),
                        ("deploy", "bench-gguf", "--context", "1024", "--load-timeout", "300")):
                done = up.strata(*cmd, timeout=600)
                if done.returncode != 0:
                    raise SystemExit(f"strata {' '.join(cmd)} failed: {done.stdout}{done.stderr}")
            port = natsd.free_port()
            peer = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf_file),
                    "--port",
                    str(port),
                    "--n_ctx",
                    "1024",
                    "--n_threads",
                    str(args.threads),
                    "--n_threads_batch",
                    str(args.threads),
                    "--interrupt_requests",
                    "False",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_http(f"http://127.0.0.1:{port}/v1/models")
            servers = {
                "strata gateway (llama.cpp runtime)": (
                    openai.OpenAI(base_url=up.url("api-gateway") + "/v1", api_key=up.api_key, timeout=600),
                    "bench-gguf",
                ),
                "llama-cpp-python server": (
                    openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600),
                    "bench",
                ),
            }
            for client, model in servers.values():  # warm-up
                one_stream(client, model, 8)
            single: dict[str, list[float]] = {k: [] for k in servers}
            agg: dict[str, list[tuple[float, float]]] = {k: [] for k in servers}
            for r in range(args.repeat):
                for name, (client, model) in servers.items():
                    ttft, n, rate = one_stream(client, model, args.new_tokens)
                    single[name].append(rate)
                    print(
                        f"  run {r + 1} {name}: 1 stream {rate:.1f} tok/s ({n} chunks, ttft {ttft:.2f}s), "
                        f"load {loadavg()}",
                        flush=True,
                    )
                    if args.concurrent > 1:
                        agg[name].append(concurrent(client, model, args.new_tokens, args.concurrent))
                        a, t = agg[name][-1]
                        print(
                            f"  run {r + 1} {name}: {args.concurrent} streams {a:.1f} tok/s aggregate, "
                            f"mean ttft {t:.2f}s, "
                            f"load {loadavg()}",
                            flush=True,
                        )
            n = args.concurrent
            print(f"\n{args.quant}, hidden {args.hidden}, {args.layers} layers, {args.threads} llama.cpp threads each")
            print(
                f"| server | 1 stream decode tok/s (best) | {n} streams aggregate tok/s (best) "
                f"| mean TTFT at {n} (s, best) |"
            )
            print("|---|---|---|---|")
            for name in servers:
                best = max(agg[name]) if agg[name] else (0.0, 0.0)
                ttft = min(t for _, t in agg[name]) if agg[name] else 0.0
                print(f"| {name} | {max(single[name]):.1f} | {best[0]:.1f} | {ttft:.2f} |")
            print(f"load average now {loadavg()}")
        finally:
            if peer is not None:
                peer.terminate()
                peer.wait(timeout=30)
            up.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
