#!/usr/bin/env bash
# Sets podman up on a Debian 12 machine as ../../../shared/CONTAINERS.md describes, and builds the base
# image localhost/debian-bookworm:min from Debian's packages (no registry needed). Idempotent: each step
# is skipped when already done. Needs root (apt, /etc/containers). Exits non-zero with the reason.
set -euo pipefail
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm:min}
die() { echo "podman setup: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get and /etc/containers); run it as root or with sudo"
[ -r /etc/debian_version ] || die "written for Debian 12 (apt, debootstrap); this machine is not Debian"

missing=""
for pair in podman:podman runc:runc podman-compose:podman-compose debootstrap:debootstrap; do
  command -v "${pair%%:*}" >/dev/null || missing="$missing ${pair##*:}"
done
if [ -n "$missing" ]; then
  echo "podman setup: installing$missing"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null || die "apt-get install$missing failed"
fi

# runc (crun refuses a hybrid cgroup layout), cgroupfs (no systemd), and no default ulimits (a sandbox may
# forbid raising RLIMIT_NOFILE/NPROC). An existing file is left alone unless it lacks these settings.
CONF=/etc/containers/containers.conf
if ! { [ -f "$CONF" ] && grep -q '^runtime *= *"runc"' "$CONF" && grep -q '^cgroup_manager *= *"cgroupfs"' "$CONF"; }; then
  [ -f "$CONF" ] && cp "$CONF" "$CONF.before-strata" && echo "podman setup: kept the old $CONF as $CONF.before-strata"
  mkdir -p /etc/containers
  cat > "$CONF" <<'CONF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
  echo "podman setup: wrote $CONF (runc, cgroupfs, no default ulimits)"
fi

podman info >/dev/null 2>&1 || die "podman is installed but 'podman info' fails: $(podman info 2>&1 | tail -1)"
podman run --rm --help >/dev/null  # the client answers

if podman image exists "$BASE_IMAGE"; then
  echo "podman setup: base image $BASE_IMAGE already there"
else
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  ROOTFS=$(mktemp -d)
  trap 'rm -rf "$ROOTFS"' EXIT
  echo "podman setup: building $BASE_IMAGE with debootstrap from $MIRROR (about a minute)"
  # minbase has no Python: the images need python3 (3.11) with venv, and ca-certificates for pip
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" >/tmp/strata-debootstrap.log 2>&1 \
    || die "debootstrap failed, see /tmp/strata-debootstrap.log: $(tail -1 /tmp/strata-debootstrap.log)"
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null || die "podman import of the base image failed"
fi

# the smoke test: a container starts, runs the base image's python3 and is removed
podman run --rm "$BASE_IMAGE" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/tmp/strata-podman-smoke.log \
  || die "a container does not start: $(tail -3 /tmp/strata-podman-smoke.log)"
echo "podman setup: ready (podman $(podman version --format '{{.Client.Version}}'), base image $BASE_IMAGE)"
