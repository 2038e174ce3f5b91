"""The blob store moved to shared/blob_store.py (model-store writes it, the workers read it); this name
stays for `strata up`'s provisioning (cli/provision.py) until the CLI takes it from there."""

from shared.blob_store import BlobStore, blob_store_config

__all__ = ["BlobStore", "blob_store_config"]
