"""The images infra/podman/build.sh builds: Strata's run as a non-root user, and none holds a secret
(no private key or API key file in its filesystem, none in its environment or build history)."""

from __future__ import annotations

import os
import re

import pytest

from tests.containers import podman as pc

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.environ.get("STRATA_CONTAINER_TESTS") != "1",
                       reason=f"needs the images built under podman: run it with {pc.HOW_TO_RUN}"),
]
STRATA_IMAGES = ["strata:slim", "strata:worker-cpu"]
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE)", re.I)
# a PEM private key (its marker alone on a line: not a library's string constant for it), a Strata API
# key, a `strata up` key file, a NATS credential file
SCAN = ("grep -rlIE --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "
        "'^-----BEGIN ([A-Z]+ )?PRIVATE KEY-----$|sk-strata-[0-9a-f]{20}' / ; "
        "find / -xdev \\( -name api-key -o -name '*.creds' -o -name '*.nk' -o -name '.strata' \\) -print")


@pytest.fixture(scope="module", autouse=True)
def built():
    missing = [i for i in STRATA_IMAGES if pc.podman("image", "exists", i, check=False).returncode != 0]
    if missing:
        pytest.fail(f"images not built: {missing}: run infra/podman/build.sh")


@pytest.mark.parametrize("image", STRATA_IMAGES)
def test_runs_as_a_non_root_user(image):
    assert pc.podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "strata"
    ids = pc.podman("run", "--rm", "--entrypoint", "id", image).stdout
    assert ids.startswith("uid=10001(strata)"), ids


@pytest.mark.parametrize("image", STRATA_IMAGES)
def test_holds_no_secret(image):
    env = pc.podman("image", "inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}", image).stdout.split()
    assert not [e for e in env if SECRET_NAME.search(e.split("=", 1)[0])], env
    history = pc.podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert not SECRET_NAME.search(history.replace("PIP_NO_INDEX", "")), history
    assert "sk-strata-" not in history
    found = pc.podman(
        "run", "--rm", "--user", "root", "--entrypoint", "sh", image, "-c", SCAN, check=False, timeout=300
    )
    assert found.stdout.split() == [], f"secrets in {image}: {found.stdout}"
    assert found.returncode in (0, 1), found.stderr  # grep's 1: nothing found


def test_the_scan_finds_a_planted_key():
    planted = "printf -- '-----BEGIN EC PRIVATE KEY-----\\nMHcCAQEE\\n' > /tmp/leak.pem; touch /tmp/api-key; "
    found = pc.podman(
        "run", "--rm", "--user", "root", "--entrypoint", "sh", STRATA_IMAGES[0], "-c", planted + SCAN, check=False
    )
    assert sorted(found.stdout.split()) == ["/tmp/api-key", "/tmp/leak.pem"], found.stdout + found.stderr


def test_the_cpu_worker_holds_its_decode_loop_prebuilt():
    """kernels/cpu_gemv.cpp is built in the image's build stage (the image has no compiler) and loads."""
    from services.inference_worker.kernels import cpu_gemv

    probe = "from services.inference_worker.kernels import cpu_gemv; print(cpu_gemv.unavailable())"
    out = pc.podman("run", "--rm", "--entrypoint", "python", "strata:worker-cpu", "-c", probe).stdout.strip()
    missing = [flag for flag in cpu_gemv.CPU_FLAGS if flag not in cpu_gemv._cpu_flags()]
    assert out == (f"this CPU lacks {', '.join(missing)}" if missing else "None"), out
    assert pc.podman("run", "--rm", "--entrypoint", "sh", "strata:worker-cpu", "-c", "command -v g++ cc gcc",
                     check=False).stdout.strip() == ""
