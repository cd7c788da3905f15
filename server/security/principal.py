"""``Principal``: who a request acts for (tenant, scopes), handed from a front-end to the layers below it.

A front-end authenticates each call and opens its principal (``open_principal``) for the rest of the
calling task, as ``cache.scope`` does for the cache; ``current_principal`` reads it back. Scopes are
ordered: ``admin`` may do what ``write`` may, which may do what ``read`` may.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from tritonrag.clients.wire.auth import Scope

from ..errors import PermissionDeniedError

DEFAULT_TENANT = "default"

_RANK = {Scope.read: 0, Scope.write: 1, Scope.admin: 2}


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: its ``tenant``, its ``scopes``, and ``subject`` (``key:<id>`` or
    ``jwt:<sub>``), the name rate limits and logs know it by."""

    tenant: str
    scopes: frozenset[Scope]
    subject: str

    def allows(self, scope: Scope) -> bool:
        """Whether one of its scopes is ``scope`` or above it."""
        return any(_RANK[held] >= _RANK[scope] for held in self.scopes)

    def require(self, scope: Scope) -> None:
        """``PermissionDeniedError`` unless it ``allows(scope)``."""
        if not self.allows(scope):
            held = ", ".join(sorted(self.scopes)) or "none"
            raise PermissionDeniedError(f"this credential's scopes ({held}) do not include {scope.value!r}")


# The caller when auth.enabled is false: the default tenant, with every scope.
ANONYMOUS = Principal(DEFAULT_TENANT, frozenset({Scope.admin}), "anonymous")

_PRINCIPAL: ContextVar[Principal] = ContextVar("tritonrag_principal")


def open_principal(principal: Principal) -> None:
    """Make ``principal`` the current request's, for the rest of the calling task."""
    _PRINCIPAL.set(principal)


def current_principal() -> Principal:
    """The current request's principal; ``LookupError`` outside a request a front-end authenticated."""
    return _PRINCIPAL.get()
