"""How many copies JetStream keeps of Strata's streams: ``STRATA_STREAM_REPLICAS`` (1 by default).

One server: 1. A 3-node cluster: 3, so the events survive the loss of any one server. Services that
create their own streams, KV buckets or object stores can read the same setting here.
"""

from __future__ import annotations

import os

MAX_REPLICAS = 5  # JetStream's own limit


def stream_replicas(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    text = env.get("STRATA_STREAM_REPLICAS", "").strip() or "1"
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise ValueError(f"STRATA_STREAM_REPLICAS must be a whole number from 1 to {MAX_REPLICAS}; got {text!r}")
    return int(text)
