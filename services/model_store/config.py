"""model-store's own settings (``STRATA_MODEL_STORE_*``), beside the shared ones every service reads."""

from __future__ import annotations

import os


def builtin_enabled() -> bool:
    """``STRATA_MODEL_STORE_BUILTIN=0`` skips registering the built-in model at first start (tests)."""
    return os.environ.get("STRATA_MODEL_STORE_BUILTIN", "1").lower() not in ("0", "false", "no")
