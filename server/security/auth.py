"""``Authenticator``: the credential of a call (an API key or a JWT) to the ``Principal`` it acts for.

Both front-ends hand it what the call carries: ``Authorization: Bearer <key or JWT>`` or ``X-API-Key``
(gRPC: the ``authorization`` / ``x-api-key`` metadata), and ``X-Tenant``, with which an admin acts for
another tenant. Refusals never echo the credential.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import replace

from tritonrag.clients.wire.auth import ApiKeyCreated, Scope
from tritonrag.clients.wire.schema import NAME_PATTERN

from ..config import AuthSettings
from ..errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from .keys import KEY_PREFIX, KeyStore
from .principal import ANONYMOUS, DEFAULT_TENANT, Principal
from .tokens import TokenVerifier

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
API_KEY = "x-api-key"
TENANT = "x-tenant"


class Authenticator:
    """API keys from ``keys`` (None: no key is valid), JWTs as ``settings.jwt`` says; every caller is
    ``ANONYMOUS`` when auth is off."""

    def __init__(self, settings: AuthSettings, keys: KeyStore | None) -> None:
        self._enabled = settings.enabled
        self._keys = keys
        self._tokens = TokenVerifier(settings.jwt)

    async def authenticate(self, authorization: str | None, api_key: str | None, tenant: str | None) -> Principal:
        """The principal of a call that carries these headers; ``UnauthenticatedError`` without a valid
        credential, ``PermissionDeniedError`` when ``tenant`` names another tenant and the caller is no admin."""
        principal = await self._credential(authorization, api_key) if self._enabled else ANONYMOUS
        if not tenant or tenant == principal.tenant:
            return principal
        if not principal.allows(Scope.admin):
            raise PermissionDeniedError(f"acting for another tenant ({TENANT}) needs the {Scope.admin.value!r} scope")
        if not re.fullmatch(NAME_PATTERN, tenant):
            raise InvalidArgumentError(f"{TENANT} must match {NAME_PATTERN}", field=TENANT)
        return replace(principal, tenant=tenant)

    async def _credential(self, authorization: str | None, api_key: str | None) -> Principal:
        if api_key:
            return self._key(api_key)
        if not authorization:
            raise UnauthenticatedError(
                "a credential is needed: 'Authorization: Bearer <API key or JWT>' or 'X-API-Key: <API key>'"
            )
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise UnauthenticatedError("the Authorization header must be 'Bearer <API key or JWT>'")
        if not credential.startswith(KEY_PREFIX) and credential.count(".") == 2 and self._tokens.configured:
            return await self._tokens.verify(credential)
        return self._key(credential)

    def _key(self, key: str) -> Principal:
        info = self._keys.verify(key) if self._keys is not None else None
        if info is None:
            raise UnauthenticatedError("unknown or revoked API key")
        return Principal(info.tenant, frozenset(info.scopes), f"key:{info.id}")


def prepare_keys(keys: KeyStore, settings: AuthSettings) -> None:
    """Store the operator's ``auth.admin_key``; on a first start without one, make an admin key and print it
    once on stderr (not in the log: logs must never hold a key). Warn when auth is off."""
    if not settings.enabled:
        log.warning("auth.enabled is false: every caller can do everything, as an admin of tenant %r", DEFAULT_TENANT)
        return
    if settings.admin_key is not None:
        keys.add(settings.admin_key.get_secret_value(), DEFAULT_TENANT, [Scope.admin], "auth.admin_key")
        return
    if keys.list():
        return
    created = keys.create(DEFAULT_TENANT, [Scope.admin], "made at first start")
    _announce(created, keys)


def _announce(created: ApiKeyCreated, keys: KeyStore) -> None:
    sys.stderr.write(
        f"\ntritonrag: made the admin key {created.id} of tenant {created.tenant!r}. It is shown this once; only\n"
        f"its SHA-256 is kept, in {keys.where}. Send it as 'Authorization: Bearer <key>'\n"
        f"(the tritonrag CLI reads TRITONRAG_API_KEY):\n\n    {created.key}\n\n"
    )
    sys.stderr.flush()
