"""The wire types of API-key management (``/v1/keys``), shared by the server and the SDK."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from .schema import NAME_PATTERN


class Scope(StrEnum):
    """What a credential may do: ``read`` (get, list, search, query, generate), ``write`` (create, upsert,
    delete), ``admin`` (keys, the cache, other tenants). Each includes the ones before it."""

    read = "read"
    write = "write"
    admin = "admin"


class ApiKeyCreate(BaseModel):
    """A new key: its tenant, its scopes and a name for people (who holds it, what for)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=NAME_PATTERN)
    scopes: list[Scope] = Field(min_length=1, max_length=3)
    name: str = Field("", max_length=128)


class ApiKeyInfo(BaseModel):
    """A stored key, without its secret: ``id`` names it in lists and revocations."""

    id: str
    tenant: str
    scopes: list[Scope]
    name: str
    created_at: float
    revoked_at: float | None = None


class ApiKeyCreated(ApiKeyInfo):
    """A key just made: ``key`` is the secret, shown this once (only its hash is stored)."""

    key: str
