"""``TokenVerifier``: JWT bearer tokens checked with PyJWT: signature, algorithm, expiry, not-before, issuer, audience.

The accepted algorithm follows from the key the operator configured, never from the token: HS256
only with ``auth.jwt.hs256_secret``, RS256 only with a public key or a JWKS. So ``alg: none`` and
HS/RS confusion (an RS256 public key used as an HMAC secret) are refused before any check runs.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import jwt
from jwt import PyJWKClient, PyJWKSet

from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.schema import NAME_PATTERN

from ..config import JwtSettings
from ..errors import UnauthenticatedError
from .principal import Principal


class TokenVerifier:
    """Turns a JWT into a ``Principal``; ``configured`` is false when no verification key is set."""

    def __init__(self, settings: JwtSettings) -> None:
        self._settings = settings
        self._keys: dict[str, Any] = {}  # algorithm -> key, for keys known at start
        if settings.hs256_secret is not None:
            self._keys["HS256"] = settings.hs256_secret.get_secret_value()
        if settings.rs256_public_key_file is not None:
            self._keys["RS256"] = settings.rs256_public_key_file.read_text()
        jwks = settings.jwks_file
        self._jwks = PyJWKSet.from_json(jwks.read_text()) if jwks is not None else None
        self._jwks_client = PyJWKClient(settings.jwks_url) if settings.jwks_url is not None else None

    @property
    def configured(self) -> bool:
        return bool(self._keys) or self._jwks is not None or self._jwks_client is not None

    def _algorithms(self) -> set[str]:
        rs256 = self._jwks is not None or self._jwks_client is not None
        return set(self._keys) | ({"RS256"} if rs256 else set())

    async def verify(self, token: str) -> Principal:
        """The principal ``token`` names; ``UnauthenticatedError`` saying why it is refused (never echoing it)."""
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm not in self._algorithms():
                raise UnauthenticatedError(f"token algorithm {algorithm!r} is not accepted")
            key = await self._key(token, algorithm, header.get("kid"))
            settings = self._settings
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp"], "verify_aud": settings.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise UnauthenticatedError(f"invalid token: {exc}") from None
        return self._principal(claims)

    async def _key(self, token: str, algorithm: str, kid: str | None) -> Any:
        if algorithm in self._keys:
            return self._keys[algorithm]
        if self._jwks is not None:
            if kid is None:
                raise jwt.InvalidTokenError("the token names no key id ('kid')")
            try:
                return self._jwks[kid].key
            except KeyError:
                raise jwt.InvalidTokenError(f"no key {kid!r} in the JWKS") from None
        assert self._jwks_client is not None
        # The client caches the key set; a fetch (rare) blocks, so it runs off the event loop.
        return (await asyncio.to_thread(self._jwks_client.get_signing_key_from_jwt, token)).key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        tenant = claims.get(self._settings.tenant_claim)
        if not isinstance(tenant, str) or not re.fullmatch(NAME_PATTERN, tenant):
            raise UnauthenticatedError(f"the token's {self._settings.tenant_claim!r} claim is not a tenant name")
        granted = claims.get(self._settings.scope_claim, "")
        names = granted.split() if isinstance(granted, str) else granted if isinstance(granted, list) else []
        scopes = frozenset(Scope(name) for name in names if name in Scope.__members__)
        return Principal(tenant, scopes, f"jwt:{claims.get('sub', tenant)}")
