"""API-key management for admins: ``POST /v1/keys``, ``GET /v1/keys``, ``DELETE /v1/keys/{key_id}``.

Keys take effect, and revocations too, at the next request of every orchestrator over the same key
store: nothing is cached, nothing needs a restart.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, status

from tritonrag.clients.wire.auth import ApiKeyCreate, ApiKeyCreated, ApiKeyInfo, Scope

from ..security.keys import KeyStore
from .auth import Guard
from .errors import ERROR_RESPONSES


def keys_router(keys: KeyStore, guard: Guard) -> APIRouter:
    """The key routes over ``keys``, for callers with the ``admin`` scope."""
    router = APIRouter(prefix="/v1", tags=["keys"], responses=ERROR_RESPONSES, dependencies=[guard(Scope.admin)])

    @router.post("/keys", status_code=status.HTTP_201_CREATED)
    async def create_key(request: ApiKeyCreate) -> ApiKeyCreated:
        """Make a key; the answer holds the secret, this once (only its SHA-256 is stored)."""
        return await asyncio.to_thread(keys.create, request.tenant, request.scopes, request.name)

    @router.get("/keys")
    async def list_keys(tenant: str | None = None) -> dict[str, list[ApiKeyInfo]]:
        """Every key (of ``tenant`` when given), revoked ones included, without their secrets."""
        return {"keys": await asyncio.to_thread(keys.list, tenant)}

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str) -> ApiKeyInfo:
        """Revoke a key: from the next request on, it is refused (401)."""
        return await asyncio.to_thread(keys.revoke, key_id)

    return router
