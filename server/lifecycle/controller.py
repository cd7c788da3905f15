"""``RolloutController``: validate → load side by side → smoke → move traffic → judge → promote or roll back.

The orchestrator, not Triton's reload, decides which versions of a model serve: Triton runs in explicit
mode with exactly the versions the controller wants loaded (``VersionLoader``), and every request is
pinned to a version by the pool's routes. A version moves through the states of ``VersionState``:

- **publish** (an operator, or the repository watcher for a version directory that appeared by other
  means): the version directory is checked (files, runtime hash, ONNX header, parity report), loaded
  beside the stable version on every endpoint, and given a smoke inference pinned to it. A version that
  fails any of these is ``failed``, never served, and unloaded.
- **canary** (reranker, generator): its share of the unpinned traffic grows through
  ``rollout.canary_steps``; each step lasts at least ``step_dwell_s`` and ``min_requests`` canary requests,
  and is judged from the per-version stats (error ratio and median latency against the stable version's in
  the same window). Out of bounds: automatic rollback with the reason recorded. A canary request that
  fails is answered by the stable version, so clients do not see the canary's failures before the first
  delta of a stream.
- **embedder**: requests are pinned to a collection's embedder version, so an embedder has no traffic
  share to grow: the new version becomes stable for new work at once and every collection starts a
  blue/green re-index to it; each switches when its new index is complete. A version stays loaded while a
  collection still needs it.
- **rollback**: ends a canary, or returns to the newest ``previous`` version (loaded again, smoke-tested,
  and for an embedder with a re-index of every collection back to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tritonrag.clients.wire.models import (
    ModelStatus,
    RolloutPolicy,
    VersionInfo,
    VersionState,
    VersionTraffic,
)
from tritonrag.clients.wire.schema import JobInfo, SamplingParams
from tritonrag.export.errors import ExportError
from tritonrag.export.repository import check_version_dir, versions

from ..config import ModelSettings, RolloutSettings
from ..errors import FailedPreconditionError, NotFoundError, TritonRagError
from ..routing.triton_pool import TritonPool
from ..routing.versions import Route
from .loading import VersionLoader
from .state import RolloutState, VersionRecord

log = logging.getLogger(__name__)

SMOKE_TEXTS = ["Triton serves models over HTTP and gRPC.", "A smoke test of a new model version."]
SMOKE_TIMEOUT_S = 60.0


class EmbedderUsers(Protocol):
    """What the controller needs of the collections: which embedder versions they need, and re-indexing."""

    async def embedder_versions_in_use(self) -> set[str]: ...

    async def reindex_all(self, version: str) -> list[JobInfo]: ...


@dataclass
class _Canary:
    """The running canary of a model: when its current step began."""

    step_started: float


class RolloutController:
    """Roll-outs of the models in ``names`` over the pool's endpoints, persisted in ``state``."""

    def __init__(
        self,
        pool: TritonPool,
        state: RolloutState,
        repository: Path,
        names: ModelSettings,
        settings: RolloutSettings,
        embedder_users: EmbedderUsers,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._state = state
        self._repository = repository
        self._names = names
        self.settings = settings
        self._users = embedder_users
        self._loader = VersionLoader(pool, repository, settings.load_timeout_s)
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._canaries: dict[str, _Canary] = {}
        self._seen: dict[tuple[str, str], tuple[int, int, float]] = {}  # watcher: a new directory's fingerprint
        self._next_scan = 0.0
        self._task: asyncio.Task[None] | None = None
        self._unreconciled: set[str] = set()

    def models(self) -> list[str]:
        """The models under roll-out control: the embedder, the reranker, the generator(s)."""
        return self._names.names()

    def task(self, model: str) -> str:
        """The task of ``model`` (``embedder``, ``reranker`` or ``generator``); NotFoundError for another name."""
        tasks = {self._names.embedder: "embedder", self._names.reranker: "reranker", self._names.generator: "generator"}
        if self._names.fallback_generator:
            tasks[self._names.fallback_generator] = "generator"
        if model not in tasks:
            raise NotFoundError(f"model {model!r} is not one of the configured models {sorted(tasks)}")
        return tasks[model]

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    # Start and background work

    async def start(self) -> None:
        """Restore every model's routes and loaded versions from the state (adopting the newest served version
        of a model seen for the first time), then judge canaries and watch the repository in the background."""
        for model in self.models():
            await self._try_reconcile(model)
        self._task = asyncio.create_task(self._run(), name="rollout-controller")

    async def _try_reconcile(self, model: str) -> None:
        """``_reconcile``; a failure (Triton unreachable, a load refused) is logged and retried at the next pass."""
        async with self._lock(model):
            try:
                restored = await self._reconcile(model)
            except TritonRagError as exc:
                log.warning("could not restore the versions of '%s' yet: %s", model, exc)
                restored = False
            if restored:
                self._unreconciled.discard(model)
            else:
                self._unreconciled.add(model)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._state.close()

    async def _reconcile(self, model: str) -> bool:
        """Restore ``model``'s route and loaded versions; False while no endpoint serves a model seen for the
        first time (nothing to adopt yet)."""
        records = self._state.versions(model)
        if not any(r.state is VersionState.stable for r in records):
            served = sorted({v for ready in self._pool.ready_versions(model).values() for v in ready}, key=int)
            if not served:
                if model not in self._unreconciled:
                    log.info("model '%s' is not served by any endpoint; its roll-outs start when it is", model)
                return False
            self._adopt(model, served[-1])
        for record in self._state.in_state(model, VersionState.validating):  # interrupted by a restart
            self._state.record(
                model, record.version, VersionState.failed, "refused", "validation interrupted by a restart"
            )
        self._apply_route(model)
        await self._load_needed(model)
        return True

    def _adopt(self, model: str, version: str) -> None:
        """Make ``version`` the stable version of a model the controller has not seen; older version directories
        count as ``previous`` (a rollback may return to them), so the watcher does not roll them out."""
        known = {r.version for r in self._state.versions(model)}
        for older in versions(self._repository / model):
            if older < int(version) and str(older) not in known:
                self._state.record(model, str(older), VersionState.previous, "adopted", "older than the stable version")
        self._state.record(model, version, VersionState.stable, "adopted", "served when roll-outs began", share=1.0)

    def _apply_route(self, model: str) -> None:
        stable = self._stable(model)
        if stable is None:
            self._pool.routes.clear(model)
            return
        canary = self._canary(model)
        if canary is None:
            self._canaries.pop(model, None)
            self._pool.routes.set(model, Route(stable.version))
        else:
            self._canaries.setdefault(model, _Canary(self._clock()))
            self._pool.routes.set(model, Route(stable.version, canary.version, canary.share))

    async def _needed(self, model: str) -> set[str]:
        """The versions of ``model`` that must stay loaded."""
        kept = {VersionState.stable, VersionState.canary, VersionState.validating}
        needed = {r.version for r in self._state.versions(model) if r.state in kept}
        if self.task(model) == "embedder":
            needed |= await self._users.embedder_versions_in_use()
        return needed

    async def _load_needed(self, model: str, extra: frozenset[str] = frozenset()) -> None:
        needed = await self._needed(model) | extra
        if needed:
            await self._loader.load(model, needed)
            self._state.set_loaded(model, needed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.tick()
            except Exception:  # the loop must survive anything one pass meets
                log.exception("the roll-out controller's pass failed")

    async def tick(self) -> None:
        """One pass: restore what start could not, judge each canary, unload embedder versions no collection needs,
        scan the repository."""
        for model in sorted(self._unreconciled):
            await self._try_reconcile(model)
        for model in self.models():
            async with self._lock(model):
                if self._canary(model) is not None:
                    await self._judge(model)
                elif self.task(model) == "embedder" and self._stable(model) is not None:
                    needed = await self._needed(model)
                    if set(self._state.loaded(model)) != needed:
                        await self._load_needed(model)
        if self.settings.watch_interval_s and self._clock() >= self._next_scan:
            self._next_scan = self._clock() + self.settings.watch_interval_s
            await self.scan()

    # Publish

    async def publish(self, model: str, version: str, policy: RolloutPolicy | None = None) -> ModelStatus:
        """Validate ``version`` of ``model``, load it beside the stable version, smoke-test it, then move traffic
        by ``policy`` (an embedder: stable at once, with a re-index of every collection).
        ``FailedPreconditionError`` with the reason when the version is refused (it is then ``failed``)."""
        task = self.task(model)
        policy = policy or RolloutPolicy(self.settings.default_policy)
        async with self._lock(model):
            record = self._state.get(model, version)
            if record is not None and record.state in (VersionState.stable, VersionState.canary):
                raise FailedPreconditionError(f"'{model}' version {version} is already {record.state.value}")
            if self._canary(model) is not None:
                raise FailedPreconditionError(f"'{model}' has a canary running; roll it back or wait for it to end")
            version_dir = self._repository / model / version
            if not version_dir.is_dir():
                raise NotFoundError(f"'{model}' has no version directory {version_dir}")
            await self._validate(model, version, task, version_dir)
            stable = self._stable(model)
            if task == "embedder":
                await self._promote(model, version, "published", "blue/green: each collection switches when re-indexed")
            elif policy is RolloutPolicy.immediate or stable is None:
                await self._promote(model, version, "published", f"policy {policy.value}")
            else:
                first = self.settings.canary_steps[0]
                self._state.record(
                    model, version, VersionState.canary, "canary started", f"share {first:.0%}", share=first
                )
                self._pool.version_stats.restart(model)
                self._canaries[model] = _Canary(self._clock())
                self._apply_route(model)
        return await self.status(model)

    async def _validate(self, model: str, version: str, task: str, version_dir: Path) -> None:
        """Files, then a load beside the served versions on every endpoint, then a smoke inference; on failure the
        version is ``failed`` and unloaded, and ``FailedPreconditionError`` says why."""
        self._state.record(model, version, VersionState.validating, "validating")
        try:
            metadata = await asyncio.to_thread(check_version_dir, version_dir, task)
            await self._load_needed(model)
            await self._smoke(model, version, task, metadata)
        except (ExportError, TritonRagError) as exc:
            reason = str(exc).split("\n", 1)[0][:500]
            self._state.record(model, version, VersionState.failed, "refused", reason)
            with contextlib.suppress(TritonRagError):
                await self._load_needed(model)
            raise FailedPreconditionError(f"'{model}' version {version} was refused: {reason}") from exc

    async def _smoke(self, model: str, version: str, task: str, metadata: dict[str, Any]) -> None:
        """One inference pinned to the new version, with outputs of the right shape and finite values."""
        async with asyncio.timeout(SMOKE_TIMEOUT_S):
            if task == "embedder":
                vectors = await self._pool.embed(SMOKE_TEXTS, version=version)
                width = metadata.get("dimension")
                norms = [math.sqrt(float((row * row).sum())) for row in vectors]
                if width is not None and vectors.shape[1] != width:
                    raise FailedPreconditionError(f"vectors are {vectors.shape[1]} wide, the metadata says {width}")
                if not all(abs(n - 1.0) < 1e-3 for n in norms):
                    raise FailedPreconditionError(f"vectors are not unit length (norms {norms})")
            elif task == "reranker":
                scores = await self._pool.rerank(SMOKE_TEXTS[0], SMOKE_TEXTS, version=version)
                if scores.shape != (len(SMOKE_TEXTS),) or not all(math.isfinite(float(s)) for s in scores):
                    raise FailedPreconditionError(f"scores {scores.tolist()} are not one finite number per passage")
            else:
                params = SamplingParams(max_tokens=4, temperature=0.0)
                deltas = [d async for d in self._pool.generate(params, prompt="Hello", model=model, version=version)]
                if not deltas or deltas[-1].finish_reason is None or deltas[-1].completion_tokens < 1:
                    raise FailedPreconditionError("the generation did not finish with at least one token")

    async def _promote(self, model: str, version: str, event: str, detail: str = "") -> None:
        """Make ``version`` stable: the old stable becomes ``previous``, traffic moves, and what no longer needs
        to be loaded is unloaded; an embedder's collections start re-indexing to it."""
        old = self._stable(model)
        if old is not None and old.version != version:
            self._state.record(model, old.version, VersionState.previous, "replaced", f"by version {version}")
        self._state.record(model, version, VersionState.stable, event, detail, share=1.0)
        self._canaries.pop(model, None)
        self._apply_route(model)
        if self.task(model) == "embedder":
            jobs = await self._users.reindex_all(version)
            detail = f"{len(jobs)} collection(s) re-indexing to version {version}"
            self._state.record(model, version, VersionState.stable, "re-index started", detail, share=1.0)
        await self._load_needed(model)

    # Canary

    async def _judge(self, model: str) -> None:
        canary, stable = self._canary(model), self._stable(model)
        if canary is None or stable is None:
            return
        bounds = self.settings
        new = self._pool.version_stats.window(model, canary.version)
        old = self._pool.version_stats.window(model, stable.version)
        step = canary.step + 1
        reason = None
        if new.errors >= bounds.max_canary_errors:
            reason = f"{new.errors} failed requests in step {step} (last: {new.last_error})"
        elif (
            new.requests >= bounds.min_requests and new.error_ratio > old.error_ratio + bounds.max_error_ratio_increase
        ):
            reason = (
                f"error ratio {new.error_ratio:.3f} against {old.error_ratio:.3f} for version {stable.version} "
                f"in step {step}"
            )
        if reason is not None:
            await self._end_canary(model, canary, f"automatic: {reason}")
            return
        started = self._canaries.setdefault(model, _Canary(self._clock())).step_started
        if self._clock() - started < bounds.step_dwell_s or new.requests < bounds.min_requests:
            return
        # Latency is judged once a step has its requests, on medians: a p95 of a few dozen requests on a busy
        # machine swings by more than any bound worth setting (measured: 46 against 29 ms for the same model).
        if (
            old.requests >= bounds.min_requests
            and new.p50_s is not None
            and old.p50_s is not None
            and new.p50_s > bounds.max_latency_ratio * old.p50_s
        ):
            reason = (
                f"median latency {new.p50_s * 1000:.0f} ms against {old.p50_s * 1000:.0f} ms for version "
                f"{stable.version} in step {step} (bound: {bounds.max_latency_ratio}x)"
            )
            await self._end_canary(model, canary, f"automatic: {reason}")
            return
        detail = (
            f"step {step}: {new.requests} requests, {new.errors} errors, median {_ms(new.p50_s)} ms "
            f"(stable: {_ms(old.p50_s)} ms)"
        )
        if step >= len(bounds.canary_steps):
            await self._promote(model, canary.version, "promoted", f"after {detail}")
            return
        share = bounds.canary_steps[step]
        self._state.record(
            model,
            canary.version,
            VersionState.canary,
            "stepped",
            f"{detail}; share {share:.0%}",
            share=share,
            step=step,
        )
        self._pool.version_stats.restart(model)
        self._canaries[model] = _Canary(self._clock())
        self._apply_route(model)

    async def _end_canary(self, model: str, canary: VersionRecord, reason: str) -> None:
        self._state.record(model, canary.version, VersionState.rolled_back, "rolled back", reason)
        log.warning("'%s' version %s rolled back: %s", model, canary.version, reason)
        self._canaries.pop(model, None)
        self._apply_route(model)
        await self._load_needed(model)

    # Rollback, retire

    async def rollback(self, model: str, reason: str) -> ModelStatus:
        """End ``model``'s canary, or return to its newest ``previous`` version (loaded again and smoke-tested;
        an embedder's collections re-index back to it). ``FailedPreconditionError`` when there is nothing to
        return to."""
        task = self.task(model)
        async with self._lock(model):
            canary = self._canary(model)
            if canary is not None:
                await self._end_canary(model, canary, reason)
                return await self.status(model)
            stable = self._stable(model)
            previous = self._state.in_state(model, VersionState.previous)
            if stable is None or not previous:
                raise FailedPreconditionError(f"'{model}' has no previous version to roll back to")
            target = previous[-1]
            await self._load_needed(model, frozenset({target.version}))
            try:
                await self._smoke(model, target.version, task, {})
            except TritonRagError as exc:
                message = f"'{model}' version {target.version} failed its smoke test: {exc}"
                raise FailedPreconditionError(message) from exc
            self._state.record(model, stable.version, VersionState.rolled_back, "rolled back", reason)
            await self._promote(model, target.version, "restored by a rollback")
        return await self.status(model)

    async def retire(self, model: str, keep: int | None = None) -> ModelStatus:
        """Unload every version nothing needs, and delete the directories of all but the newest ``keep`` versions
        (default ``rollout.keep_versions``) that nothing needs; those become ``retired``."""
        keep = keep or self.settings.keep_versions
        async with self._lock(model):
            await self._load_needed(model)
            needed = await self._needed(model)
            on_disk = [str(v) for v in versions(self._repository / model)]
            kept = set(on_disk[-keep:]) | needed
            for version in on_disk:
                if version not in kept:
                    await asyncio.to_thread(shutil.rmtree, self._repository / model / version)
                    self._state.record(model, version, VersionState.retired, "retired", f"kept the newest {keep}")
        return await self.status(model)

    # Watching the repository

    async def scan(self) -> None:
        """Roll out version directories that appeared in the repository by other means (newer than every version
        the controller knows, and unchanged since the previous scan, so a copy in progress is not taken)."""
        for model in self.models():
            known = [int(r.version) for r in self._state.versions(model)]
            if not known:
                continue
            for number in versions(self._repository / model):
                if number <= max(known):
                    continue
                version = str(number)
                fingerprint = await asyncio.to_thread(_fingerprint, self._repository / model / version)
                if self._seen.get((model, version)) != fingerprint:
                    self._seen[(model, version)] = fingerprint
                    continue
                log.info("'%s' version %s appeared in the repository; rolling it out", model, version)
                with contextlib.suppress(TritonRagError):  # refused: recorded and reported by the state
                    await self.publish(model, version)
                break  # one version per model per pass: the next pass sees the new state

    # Reading

    def _stable(self, model: str) -> VersionRecord | None:
        return next(iter(self._state.in_state(model, VersionState.stable)), None)

    def _canary(self, model: str) -> VersionRecord | None:
        return next(iter(self._state.in_state(model, VersionState.canary)), None)

    async def status(self, model: str) -> ModelStatus:
        """``model``'s versions, states, shares, per-version traffic and recent events."""
        task = self.task(model)
        ready = self._pool.ready_versions(model)
        route = self._pool.routes.get(model)
        shares = route.shares() if route else {}
        infos = []
        for record in self._state.versions(model):
            total = self._pool.version_stats.total(model, record.version)
            infos.append(
                VersionInfo(
                    version=record.version,
                    state=record.state,
                    share=round(shares.get(record.version, 0.0), 4),
                    reason=record.reason,
                    loaded_on=[url for url, versions_ready in ready.items() if record.version in versions_ready],
                    traffic=VersionTraffic(
                        requests=total.requests,
                        errors=total.errors,
                        p50_ms=_ms(total.p50_s),
                        p95_ms=_ms(total.p95_s),
                    ),
                    updated_at=record.updated_at,
                )
            )
        return ModelStatus(
            name=model,
            task=task,
            stable=route.stable if route else None,
            canary=route.canary if route else None,
            canary_share=route.share if route and route.canary else 0.0,
            versions=infos,
            events=self._state.events(model),
        )

    async def statuses(self) -> list[ModelStatus]:
        """Every model's status."""
        return [await self.status(model) for model in self.models()]


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def _fingerprint(version_dir: Path) -> tuple[int, int, float]:
    """Files, bytes and the newest modification time under ``version_dir``: equal twice, the copy has settled."""
    files = [p for p in version_dir.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return len(files), sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)
