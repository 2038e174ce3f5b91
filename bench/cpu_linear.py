"""The CPU linear a decode step is made of, several ways, on weights bigger than the last-level cache
(issue #24): how fast each streams the weights at 1, 4 and 8 rows, next to a plain copy's bandwidth.

- bf16 / int8 our loop: kernels/cpu_gemv.py, what the engine runs for decode-sized products where
  it is built (plain [N, K] rows; AMX past a few rows where the CPU has it, and then also the AVX-512
  loop alone, what CPUs without AMX run);
- bf16 prepacked (oneDNN's blocked layout), fp16 prepacked (fbgemm, fp32 accumulation): the engine's
  CPU paths otherwise (engine/cpu_linear.py);
- int8 torch: ``aten._weight_int8pack_mm``, the engine's int8 kernel past decode sizes;
- bf16 plain: ``F.linear`` on the [N, K] weight;
- fp16 plain: ``F.linear`` in fp16 (torch's gemv at 1 row, a slow gemm past it);
- fp32 plain.

Each way runs over its own list of [N, K] weights (N x K the bench model's gate/up shape by default)
totalling --mb per dtype, so every product reads its weights from memory, as a decode step does. The
ways alternate within every round; best of --rounds per way and row count.

    python bench/cpu_linear.py [--n 5632 --k 1024 --mb 256 --rounds 5 --threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.host import loadavg  # noqa: E402
from bench.roofline import copy_bandwidth_gbs  # noqa: E402
from services.inference_worker.engine.cpu_linear import PackedLinear, can_pack, onednn_linear  # noqa: E402
from services.inference_worker.kernels import cpu_gemv  # noqa: E402

ROWS = (1, 4, 8)


def ways(n: int, k: int, mb: int) -> dict:
    """name -> (weights, product): each list holds --mb of that dtype's weights."""
    def weights(dtype):
        count = max(2, mb * 2**20 // (n * k * torch.empty((), dtype=dtype).element_size()))
        if dtype == torch.int8:
            return [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
        return [torch.empty(n, k, dtype=dtype).uniform_(-0.05, 0.05) for _ in range(count)]

    def fp16_packed():
        linears = []
        for w in weights(torch.float16):
            linear = torch.nn.Linear(k, n, bias=False, dtype=torch.float16, device="meta").to_empty(device="cpu")
            linear.weight.data = w
            linears.append(PackedLinear(linear))
        return linears

    scales = torch.full((n,), 0.01, dtype=torch.bfloat16)
    out = {}
    if cpu_gemv.unavailable() is None:
        out["bf16 our loop (cpu_gemv)"] = (weights(torch.bfloat16), lambda x, w: cpu_gemv.gemv_bf16(x, w, None))
        out["int8 our loop (cpu_gemv)"] = (weights(torch.int8), lambda x, w: cpu_gemv.gemv_int8(x, w, scales, None))
        if cpu_gemv.amx():
            out["bf16 our loop, AVX-512 only"] = (weights(torch.bfloat16), avx512_only(cpu_gemv.gemv_bf16))
            out["int8 our loop, AVX-512 only"] = (weights(torch.int8), avx512_only(cpu_gemv.gemv_int8, scales))
    if can_pack(torch.bfloat16):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights(torch.bfloat16)]
        out["bf16 prepacked (oneDNN)"] = (packed, lambda x, w: onednn_linear(x, w, None))
    if can_pack(torch.float16):
        out["fp16 prepacked (fbgemm)"] = (fp16_packed(), lambda x, m: m(x))
    out["int8 torch (_weight_int8pack_mm)"] = (
        weights(torch.int8), lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w, scales))
    out["bf16 plain"] = (weights(torch.bfloat16), F.linear)
    out["fp16 plain"] = (weights(torch.float16), F.linear)
    out["fp32 plain"] = (weights(torch.float32), F.linear)
    return out


def avx512_only(product, *rest):
    """The loop CPUs without AMX run, on this one (which takes AMX past a few rows)."""
    def run(x, w):
        with mock.patch.object(cpu_gemv, "amx", lambda: False):
            return product(x, w, *rest, None)
    return run


def seconds(product, xs, ws) -> float:
    t0 = time.perf_counter()
    for w in ws:
        product(xs, w)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5632)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--mb", type=int, default=256, help="weights per way, MiB (more than the LLC)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw, how = copy_bandwidth_gbs("cpu")
    print(f"# CPU linear, [{args.n}, {args.k}] weights, {args.mb} MiB per way, {args.threads} thread(s); "
          f"torch {torch.__version__}; load {loadavg()}")
    print(f"copy bandwidth: {bw:.1f} GB/s ({how})")
    for dtype, needs in (
        (torch.bfloat16, "oneDNN with avx512_bf16 or AMX"),
        (torch.float16, "a torch built with fbgemm"),
    ):
        if not can_pack(dtype):
            print(f"{dtype} prepacked: not available here (needs {needs})")
    if cpu_gemv.unavailable() is not None:
        print(f"our loop (cpu_gemv): not available here ({cpu_gemv.unavailable()})")
    table = ways(args.n, args.k, args.mb)
    def activations(w):  # PackedLinear has .dtype too; int8 weights take bf16 activations
        return torch.bfloat16 if w.dtype in (torch.int8, torch.bfloat16) else w.dtype

    xs = {(name, r): torch.randn(r, args.k).to(activations(ws[0])) for name, (ws, _) in table.items() for r in ROWS}
    best = {(name, r): float("inf") for name in table for r in ROWS}
    for name, (ws, product) in table.items():  # warm-up: first-call dispatch
        for r in ROWS:
            product(xs[name, r], ws[0])
    for _ in range(args.rounds):
        for r in ROWS:
            for name, (ws, product) in table.items():
                best[name, r] = min(best[name, r], seconds(product, xs[name, r], ws))
    print("\n| way | " + " | ".join(f"{r} row{'s' * (r > 1)}: GB/s streamed" for r in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    for name, (ws, _) in table.items():
        nbytes = sum(w.nbytes if isinstance(w, PackedLinear) else w.numel() * w.element_size() for w in ws)
        cells = [f"{nbytes / best[name, r] / 1e9:.1f} ({100 * nbytes / best[name, r] / 1e9 / bw:.0f} %)" for r in ROWS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n(%: of the copy bandwidth above; best of {args.rounds}, ways alternating; load {loadavg()})")


if __name__ == "__main__":
    main()
