"""API keys on HTTP: one FastAPI dependency per scope, the same rule in every service.

``auth = protect(service)`` opens the key store when the service starts and gives ``/healthz`` an
``auth: open | api-keys`` field; ``Depends(auth.require("admin"))`` on a route answers 401 for a
missing, unknown or revoked key and 403 for a valid key without the scope. While the bucket holds no
key at all, the platform is open (the first `strata up` on a laptop just works) and says so loudly:
a warning at start and ``auth: open`` in every health answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from shared import errors
from shared.apikey_store import KeyStore
from shared.apikeys import ApiKeyRecord, Scope
from shared.service import Health, Service, service_of

AuthMode = Literal["open", "api-keys"]
bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", bearerFormat="sk-strata-…",
                    description="An API key from `strata key create`: `Authorization: Bearer <key>`.")
OPEN_ROUTES_NOTE = ("Authentication: routes that change state need an API key with the `admin` scope "
                    "(`Authorization: Bearer <key>`); each route's security and 401/403 answers say what it needs "
                    "(the ledger's records need `read`); /healthz and /metrics are open. While no key exists at "
                    "all, every route is open (see /healthz `auth`).")


class AuthHealth(Health):
    auth: AuthMode


class KeyAuth:
    def __init__(self, service: str) -> None:
        self.service = service
        self.store: KeyStore | None = None
        self.log = logging.getLogger(service)

    async def start(
        self, js: JetStreamContext, *, create: bool = False, local_keys: list[str] | None = None
    ) -> KeyStore:
        self.store = store = await KeyStore.open(js, create=create, local_keys=local_keys)
        if store.local:
            self.log.info(
                "honouring %d API key(s) from STRATA_API_KEYS (here only; `strata key` manages the shared ones)",
                len(store.local),
            )
        if await store.is_empty(fresh=True):
            self.log.warning(
                "NO API KEY IS CONFIGURED: %s is OPEN and answers anyone. Create one (`strata key create --name "
                "admin --scope admin`) or set STRATA_API_KEYS before exposing it beyond this machine.",
                self.service,
            )
        return store

    async def open_mode(self) -> bool:
        return self.store is not None and await self.store.is_empty()

    async def mode(self) -> AuthMode:
        try:
            return "open" if await self.open_mode() else "api-keys"
        except Exception:  # NATS down: health still answers (degraded); unknown counts as closed
            return "api-keys"

    async def check(self, key: str | None, scope: Scope) -> ApiKeyRecord | None:
        """The caller's key record, or None in open mode; raises Unauthorized / Forbidden."""
        if self.store is None:
            raise errors.Unavailable(f"{self.service} is starting: its API keys are not loaded yet")
        try:
            return await self._check(self.store, key, scope)
        except NatsError as exc:  # the keys live in JetStream: without NATS no key can be checked
            raise errors.Unavailable(
                f"NATS is not reachable, so the API key cannot be checked ({type(exc).__name__})"
            ) from None

    @staticmethod
    async def _check(store: KeyStore, key: str | None, scope: Scope) -> ApiKeyRecord | None:
        if key is not None:
            record = await store.lookup(key)
            if record is not None:
                if record.revoked:
                    raise errors.Unauthorized(f"this API key ({record.id}) was revoked")
                if not record.grants(scope):
                    raise errors.Forbidden(
                        f"API key {record.id} ({record.name}) has scopes {', '.join(record.scopes)}; "
                        f"this route needs '{scope}'"
                    )
                return record
        if await store.is_empty():
            return None
        if key is None:
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        raise errors.Unauthorized("incorrect API key provided")

    def require(self, scope: Scope) -> Callable[..., Awaitable[ApiKeyRecord | None]]:
        """A FastAPI dependency: the caller's key record (None in open mode), or 401 / 403."""

        async def api_key(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> ApiKeyRecord | None:
            return await self.check(credentials.credentials if credentials else None, scope)

        api_key.__name__ = f"require_{scope}_key"
        return api_key


def protect(
    service: Service, *, create_bucket: bool = False, local_keys: list[str] | None = None, health: bool = True
) -> KeyAuth:
    """Open the key store in an on_start hook, document the rule, and (``health``) report the auth
    mode on /healthz. No service writes a key: `strata up` creates the bucket and `strata key` fills it;
    ``create_bucket`` (the gateway) makes a missing bucket where NATS has no users and nobody provisioned."""
    auth = KeyAuth(service.name)

    async def open_api_keys() -> None:
        await auth.start(service.broker.connection.jetstream(), create=create_bucket, local_keys=local_keys)

    service.on_start(open_api_keys)
    service.provide(auth)  # module-level routes find it: Depends(require("admin"))
    service.http.description = f"{service.http.description} {OPEN_ROUTES_NOTE}".strip()
    if health:
        drop_route(service.http, "/healthz")

        @service.http.get(
            "/healthz",
            response_model=AuthHealth,
            tags=["health"],
            summary="health and auth mode (open)",
            responses={503: {"model": AuthHealth, "description": "starting, or NATS not connected (degraded)"}},
        )
        async def healthz() -> JSONResponse:
            base = service.health()
            body = AuthHealth(**base.model_dump(), auth=await auth.mode())
            return JSONResponse(body.model_dump(mode="json"), status_code=200 if base.status == "ok" else 503)

    return auth


def require(scope: Scope) -> Callable[..., Awaitable[ApiKeyRecord | None]]:
    """``KeyAuth.require`` for module-level routes: the key store of the service that serves the route
    (``protect`` provides it)."""

    async def api_key(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
    ) -> ApiKeyRecord | None:
        return await service_of(request).part(KeyAuth).check(credentials.credentials if credentials else None, scope)

    api_key.__name__ = f"require_{scope}_key"
    return api_key


def drop_route(app: FastAPI, path: str) -> None:
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != path]
