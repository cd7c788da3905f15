"""The wire types of model roll-outs (``/v1/admin/models``), shared by the server, the SDK and the CLI."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class RolloutPolicy(StrEnum):
    """How traffic moves to a validated version: all at once, or step by step while the metrics stay in bounds."""

    immediate = "immediate"
    canary = "canary"


class VersionState(StrEnum):
    """Where a version of a model stands.

    ``validating``: checked and loaded beside the stable version, not yet served. ``canary``: gets a share of
    the traffic. ``stable``: gets the rest (all of it without a canary). ``previous``: was stable; a rollback
    returns to it (an embedder's stays loaded while a collection still searches with it). ``rolled_back``: a
    canary or stable version that was taken back, with the reason. ``failed``: refused by validation, never
    served. ``retired``: unloaded by ``retire``.
    """

    validating = "validating"
    canary = "canary"
    stable = "stable"
    previous = "previous"
    rolled_back = "rolled_back"
    failed = "failed"
    retired = "retired"


class RolloutRequest(BaseModel):
    """Roll out version ``version`` of a model (a version directory already in the repository)."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=r"^[1-9][0-9]{0,8}$")
    policy: RolloutPolicy | None = None  # default: rollout.default_policy


class RollbackRequest(BaseModel):
    """Take a model back to its stable version (ending a canary) or to its previous one."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("rolled back by an operator", max_length=500)


class RetireRequest(BaseModel):
    """Unload the versions nothing needs, and delete all but the newest ``keep`` of them from disk."""

    model_config = ConfigDict(extra="forbid")

    keep: int | None = Field(None, ge=1, le=100)  # default: rollout.keep_versions


class VersionTraffic(BaseModel):
    """A version's requests since the orchestrator started (successful ones timed)."""

    requests: int
    errors: int
    p50_ms: float | None = None
    p95_ms: float | None = None


class VersionInfo(BaseModel):
    """One version of a model: its state, its share of the traffic and how its requests went."""

    version: str
    state: VersionState
    share: float
    reason: str = ""
    loaded_on: list[str] = []  # the Triton endpoints where it is ready
    traffic: VersionTraffic
    updated_at: float


class ModelEvent(BaseModel):
    """One step of a model's history: published, stepped, promoted, rolled back, refused, retired."""

    at: float
    version: str
    event: str
    detail: str = ""


class ModelStatus(BaseModel):
    """A model's versions, where its traffic goes, and its recent history (newest first)."""

    name: str
    task: str
    stable: str | None
    canary: str | None = None
    canary_share: float = 0.0
    versions: list[VersionInfo]
    events: list[ModelEvent]
