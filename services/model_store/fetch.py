"""Fetching a model moved to shared/model_fetch.py (the workers fetch, not model-store); this name stays
for the CLI (cli/model.py) until it takes it from there."""

from shared.model_fetch import VerificationError, fetch_model, verify_manifest

__all__ = ["VerificationError", "fetch_model", "verify_manifest"]
