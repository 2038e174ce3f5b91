"""Who may read what of the ledger over HTTP (#19 finding 4).

Leaf contents (leaves, receipts, lineage, audit, exports) need an API key with the ``read`` scope
(``admin`` implies it); a key with only ``inference`` may fetch the receipt of a request made with
that same key (``inference.completed`` carries the key's public id) and nothing else. Public material
stays open: tree heads, the public key, inclusion and consistency proofs (hashes only), /stats,
/healthz. The NATS RPCs (`strata ledger`, `strata receipt`) are guarded by the NATS credentials
instead (docs/operations.md).
"""

from __future__ import annotations

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from shared import errors
from shared.apikey_http import KeyAuth, bearer
from shared.apikeys import ApiKeyRecord
from shared.service import service_of


async def receipt_caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
) -> ApiKeyRecord | None:
    """A FastAPI dependency: the caller's key record if it may read receipts at all (``read``, or
    ``inference`` for its own), None in open mode; 401 / 403 otherwise."""
    auth, key = service_of(request).part(KeyAuth), credentials.credentials if credentials else None
    try:
        return await auth.check(key, "read")
    except errors.Forbidden:
        return await auth.check(key, "inference")


def only_requests_of(caller: ApiKeyRecord | None) -> str | None:
    """The key id whose requests alone this caller may see receipts of; None: every request."""
    return None if caller is None or caller.grants("read") else caller.id
