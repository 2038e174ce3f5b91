#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md section 5 (issue #11) in one command, about 6 minutes at most:
#
#     bash bench/gpu.sh                    # everything goes to ${OUT:-/tmp/strata-gpu}
#
# Steps, each under `timeout`, tee'd to $OUT/<step>.log, the script going on past a failing one:
#   env      nvidia-smi, versions, clocks                                      -> env.log
#   kernels  Triton kernels vs torch eager / torch.compile, paged attention vs
#            SDPA on a contiguous cache (bench/engine.py --only-kernels)       -> kernels.log, kernels.json
#   engine   Llama-3-8B-shaped bf16 random checkpoint: batch-1 decode vs roofline, HF eager and
#            HF static cache + torch.compile, 64 concurrent requests            -> engine.log, engine.json
#   fit      bench/fit.py on the same checkpoint (predicted vs measured peak)  -> fit.log
#   tests    pytest tests/kernels, tests/engine (the GPU paths)                -> tests-*.log
# $OUT/summary.txt has each step's exit code and seconds.
#
# Nothing is installed from a registry (the GPU box has no network). bench/fit.py needs pydantic,
# which the box's python may lack: when a folder .whl/ of wheels travelled with the tree (see
# docs/benchmarks.md section 5), they are installed offline into /tmp/strata-site. The 16 GB
# checkpoint goes to /dev/shm when it has room, else /tmp, never into the repository; it is removed
# at the end. Knobs: PYTHON (default python3), STRATA_GPU_BUDGET_S (default 350), STRATA_BENCH_DIR,
# STRATA_GPU_SMOKE=1 (tiny shapes, tests only collected: checks this script on a machine without a GPU).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/strata-gpu}
PY=${PYTHON:-python3}
BUDGET=${STRATA_GPU_BUDGET_S:-350}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
: >"$OUT/summary.txt"

# step NAME LIMIT_S CMD...: runs CMD under the smaller of LIMIT_S and what is left of the budget.
step() {
    local name=$1 limit=$2 left t s rc
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    t=$((limit < left ? limit : left))
    if [ "$t" -lt 15 ]; then
        echo "== $name: SKIPPED, the ${BUDGET} s budget is spent" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "== $name (timeout ${t} s): $*"
    s=$(date +%s)
    timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && rc="124 (timed out)"
    echo "== $name: rc=$rc in $(($(date +%s) - s)) s" | tee -a "$OUT/summary.txt"
}

env_report() {
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
        --format=csv || true
    uname -a
    nproc
    free -g | head -2
    df -h /dev/shm /tmp | cat
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "safetensors", "tokenizers", "jinja2", "numpy", "pytest", "pydantic"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # report what is missing, go on
        print(f"{name} MISSING ({type(e).__name__}: {e})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}; {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("torch sees NO CUDA device")
EOF
}

offline_wheels() {
    if "$PY" -c "import pydantic" 2>/dev/null; then
        echo "pydantic present"
    elif ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/strata-site .whl/*.whl && echo "installed .whl/ offline into /tmp/strata-site"
    else
        echo "pydantic missing and no .whl/ folder: bench/fit.py will fail to import"
    fi
}

if [ -n "${STRATA_BENCH_DIR:-}" ]; then
    CKPT_ROOT=$STRATA_BENCH_DIR
elif [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')" -gt $((40 * 1024 * 1024)) ] 2>/dev/null; then
    CKPT_ROOT=/dev/shm/strata-bench
else
    CKPT_ROOT=/tmp/strata-bench
fi
# only what this script writes there is removed, even when STRATA_BENCH_DIR names a folder in use
cleanup() { rm -rf "$CKPT_ROOT/bench-llama" "$CKPT_ROOT/fit-llama3-8b" "$CKPT_ROOT/fit-tiny"; }
trap cleanup EXIT

export -f env_report
export PY
step env 30 bash -c env_report
offline_wheels | tee -a "$OUT/env.log"
[ -d /tmp/strata-site ] && export PYTHONPATH=/tmp/strata-site${PYTHONPATH:+:$PYTHONPATH}
echo "checkpoint folder: $CKPT_ROOT" | tee -a "$OUT/env.log"

if [ "${STRATA_GPU_SMOKE:-0}" = 1 ]; then
    MODEL=(--hidden 128 --layers 2 --heads 4 --kv-heads 2 --intermediate 256 --vocab 512 --new-tokens 8 --repeat 1)
    FIT=(--contexts 256 --batches 1,2) FIT_MAKE=tiny TESTS=(--co)
else
    MODEL=(--preset llama3-8b --new-tokens 128 --repeat 3)
    FIT=(--contexts 4096 --batches 1,4) FIT_MAKE=llama3-8b TESTS=()
fi
step kernels 75 "$PY" bench/engine.py --only-kernels --json "$OUT/kernels.json"
step engine 220 "$PY" bench/engine.py "${MODEL[@]}" --batch-sizes 1,64 --hf-batch-sizes 1 --skip-kernels \
    --checkpoint-dir "$CKPT_ROOT" --json "$OUT/engine.json"
if [ -f "$CKPT_ROOT/bench-llama/config.json" ]; then  # the engine step's checkpoint: no second 16 GB
    step fit 70 "$PY" bench/fit.py --checkpoint "$CKPT_ROOT/bench-llama" "${FIT[@]}"
else
    step fit 90 "$PY" bench/fit.py --make "$FIT_MAKE" --root "$CKPT_ROOT" "${FIT[@]}"
fi
cleanup  # frees the RAM a /dev/shm checkpoint holds before the tests
# conftest.py files under tests/<dir> only: tests/conftest.py imports the NATS helpers, not needed here
step tests-kernels 60 "$PY" -m pytest -q -p no:cacheprovider --confcutdir=tests/kernels ${TESTS[@]+"${TESTS[@]}"} tests/kernels
# test_compiled_decode.py: the CPU-only compiled decode step, minutes of compiling; CPU CI runs it
step tests-engine 45 "$PY" -m pytest -q -p no:cacheprovider --confcutdir=tests/engine ${TESTS[@]+"${TESTS[@]}"} \
    --ignore=tests/engine/test_compiled_decode.py tests/engine
echo "== total $(($(date +%s) - START)) s; logs in $OUT"
cat "$OUT/summary.txt"
