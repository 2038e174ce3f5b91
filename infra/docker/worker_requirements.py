"""Print the `worker` extra of pyproject.toml without torch and triton, one requirement a line.

The CUDA image starts from a PyTorch image whose torch and triton match its CUDA; installing the
extra as it is would replace them with the exact CPU-oriented pin. This keeps the rest of the extra
in one place (pyproject.toml) instead of a second list in the Dockerfile.

    python infra/docker/worker_requirements.py [pyproject.toml] > worker-reqs.txt
    python infra/docker/worker_requirements.py --cpu [pyproject.toml]   # keeps torch, drops triton

The CPU image (`--cpu`) keeps the torch pin and leaves out triton: Triton's kernels need a GPU (on a CPU
the engine runs the torch references), and its wheel is about 1 GB of the image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PROVIDED_BY_THE_BASE_IMAGE = {"torch", "triton"}


def requirements(pyproject: Path, left_out: set[str] = PROVIDED_BY_THE_BASE_IMAGE) -> list[str]:
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["worker"]
    return [req for req in extra if re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower() not in left_out]


if __name__ == "__main__":
    args = sys.argv[1:]
    cpu = "--cpu" in args
    paths = [a for a in args if a != "--cpu"]
    print(
        "\n".join(
            requirements(
                Path(paths[0] if paths else "pyproject.toml"), {"triton"} if cpu else PROVIDED_BY_THE_BASE_IMAGE
            )
        )
    )
