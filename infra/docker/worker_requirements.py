"""Print the `worker` extra of pyproject.toml without torch and triton, one requirement a line.

The CUDA image starts from a PyTorch image whose torch and triton match its CUDA; installing the
extra as it is would replace them with the exact CPU-oriented pin. This keeps the rest of the extra
in one place (pyproject.toml) instead of a second list in the Dockerfile.

    python infra/docker/worker_requirements.py [pyproject.toml] > worker-reqs.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PROVIDED_BY_THE_BASE_IMAGE = {"torch", "triton"}


def requirements(pyproject: Path) -> list[str]:
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["worker"]
    return [req for req in extra if re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower() not in PROVIDED_BY_THE_BASE_IMAGE]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
