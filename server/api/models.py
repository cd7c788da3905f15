"""Model roll-outs for admins (``/v1/admin/models``): status, publish a version, roll back, retire.

Every call acts through the roll-out controller; a refused version is 409 with the reason (it is then
``failed`` in the status), an unknown model or version directory 404.
"""

from __future__ import annotations

from fastapi import APIRouter

from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.models import ModelStatus, RetireRequest, RollbackRequest, RolloutRequest

from .auth import Guard
from .errors import ERROR_RESPONSES
from .services import Rollouts


def models_router(rollouts: Rollouts, guard: Guard) -> APIRouter:
    """The roll-out routes over ``rollouts``, for callers with the ``admin`` scope."""
    router = APIRouter(
        prefix="/v1/admin/models", tags=["models"], responses=ERROR_RESPONSES, dependencies=[guard(Scope.admin)]
    )

    @router.get("")
    async def list_models() -> dict[str, list[ModelStatus]]:
        """Every configured model: its versions, their states, traffic shares and requests, and recent events."""
        return {"models": await rollouts.statuses()}

    @router.get("/{model}")
    async def model_status(model: str) -> ModelStatus:
        """One model's versions, states, traffic shares, per-version requests and latency, and recent events."""
        return await rollouts.status(model)

    @router.post("/{model}/rollouts")
    async def publish(model: str, request: RolloutRequest) -> ModelStatus:
        """Validate a version directory of the repository, load it beside the stable version on every endpoint,
        smoke-test it, then move traffic by the policy. Answers once traffic has started to move."""
        return await rollouts.publish(model, request.version, request.policy)

    @router.post("/{model}/rollback")
    async def rollback(model: str, request: RollbackRequest) -> ModelStatus:
        """End the model's canary, or return to its previous version."""
        return await rollouts.rollback(model, request.reason)

    @router.post("/{model}/retire")
    async def retire(model: str, request: RetireRequest) -> ModelStatus:
        """Unload the versions nothing needs and delete all but the newest ``keep`` of them from disk."""
        return await rollouts.retire(model, request.keep)

    return router
