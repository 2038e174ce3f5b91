"""This machine's memory as Linux reports it: one reader for the node agent's inventory and the
worker's on-demand room (``/proc/meminfo``)."""
from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (the file says kB, meaning KiB)."""
    result = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            result[name.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return result


def available_bytes() -> int:
    """Memory a new allocation can have without swapping: MemAvailable (MemFree on old kernels)."""
    meminfo = parse_meminfo(MEMINFO.read_text())
    return meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
