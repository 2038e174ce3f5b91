"""The local disks an upload lands on: how much is free, and which paths share one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def disk_of(path: Path) -> int:
    """The file system ``path`` is on (two paths with the same answer share their free space)."""
    return os.stat(path).st_dev
