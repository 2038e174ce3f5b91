"""What every benchmark prints beside its figures: the machine is shared and noisy."""
from __future__ import annotations

import os


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '1.81 1.99 1.24'."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
