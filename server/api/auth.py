"""Authentication of every HTTP route: a dependency per route that names the scope it needs.

``Guard(scope, route_class)`` authenticates the call (``security.auth.Authenticator``), checks the
scope, opens the principal for the layers below (``security.principal``) and takes a token from the
caller's rate limit of ``route_class``. The security schemes it declares (bearer, ``X-API-Key``)
appear in the OpenAPI document, so generated clients and the fuzzer send credentials.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from tritonrag.clients.wire.auth import Scope

from ..security.auth import API_KEY, AUTHORIZATION, TENANT, Authenticator
from ..security.principal import Principal, open_principal
from ..security.ratelimit import RateLimiter, RouteClass
from ..telemetry.record import current

_BEARER = HTTPBearer(auto_error=False, description="An API key (trk_...) or a JWT")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (trk_...)")


class Guard:
    """Makes the authentication dependency of each route."""

    def __init__(self, authenticator: Authenticator, limits: RateLimiter) -> None:
        self._authenticator = authenticator
        self._limits = limits

    async def admit(
        self,
        authorization: str | None,
        api_key: str | None,
        tenant: str | None,
        scope: Scope,
        route_class: RouteClass,
    ) -> Principal:
        """The caller's principal, allowed ``scope`` and within its rate of ``route_class``, opened for the call."""
        principal = await self._authenticator.authenticate(authorization, api_key, tenant)
        record = current()
        if record is not None:
            record.caller = f"{principal.tenant}/{principal.subject}"
        principal.require(scope)
        open_principal(principal)
        await self._limits.acquire(principal.subject, route_class)
        return principal

    def __call__(self, scope: Scope, route_class: RouteClass = RouteClass.manage) -> Any:
        """A FastAPI dependency admitting callers with ``scope``, counted against ``route_class``."""

        async def authenticated(
            request: Request,
            _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
            _api_key: Annotated[str | None, Security(_API_KEY)],
        ) -> Principal:
            headers = request.headers
            return await self.admit(
                headers.get(AUTHORIZATION), headers.get(API_KEY), headers.get(TENANT), scope, route_class
            )

        return Depends(authenticated)
