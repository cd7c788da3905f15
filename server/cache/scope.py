"""One request's use of the cache, handed from a front-end to the cached tiers by a context variable.

A front-end opens a scope per request (``open_scope``): whether the client asked for a fresh result
(``Cache-Control: no-cache``), and where to report which level served it. Calls without a scope (gRPC,
tests, ingestion) use the cache normally and report nowhere.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

Level = Literal["l1", "l2", "miss"]


def _nowhere(level: Level) -> None:
    """A scope without a front-end reports nowhere."""


@dataclass(frozen=True)
class CacheScope:
    """``bypass``: serve nothing from the cache; ``report`` learns which level served the request's result."""

    bypass: bool = False
    report: Callable[[Level], None] = _nowhere


_SCOPE: ContextVar[CacheScope | None] = ContextVar("tritonrag_cache_scope", default=None)


def open_scope(scope: CacheScope) -> None:
    """Make ``scope`` the current request's, for the rest of the calling task."""
    _SCOPE.set(scope)


def current_scope() -> CacheScope:
    """The current request's scope, or a default one (use the cache, report nowhere)."""
    return _SCOPE.get() or CacheScope()
