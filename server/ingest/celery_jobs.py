"""Jobs on Celery workers (``ingest.broker_url``): orchestrators dispatch them, `tritonrag worker` processes run them.

A job lives in the catalog of the shared store (its row, progress and documents); a task carries only its id,
and a worker runs it with the same `JobRunner` as an embedded runner, after claiming it. So the job API
(`/v1/jobs`, gRPC, CLI) has one shape whoever runs the job, and every replica sees its progress.

Tasks are acknowledged late (after the job ran) and rejected when their worker dies, so the broker hands a
killed worker's job to another worker; a task whose job another runner holds is retried after the lease (that
runner may die without the broker noticing); and each worker also sweeps the catalog every half lease for jobs
whose runner died (`JobRunner.start`), whatever the broker does. A dispatch that fails (the broker is down) is
logged and the job stays queued for that sweep: the upsert was acknowledged once its job was stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery import Celery, Task

from tritonrag.server.config import Settings
from tritonrag.server.ingest.jobs import Dispatch

log = logging.getLogger(__name__)

RUN_JOB = "tritonrag.run_job"  # the task: run the job of this id
QUEUE = "tritonrag-jobs"
_T = TypeVar("_T")


def celery_app(settings: Settings) -> Celery:
    """The Celery application of ``settings.ingest``'s broker."""
    lease_s = settings.ingest.job_lease_s
    app = Celery("tritonrag", broker=settings.ingest.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # A task unacknowledged for this long goes to another worker (its worker died); a job that runs longer
        # is still running on one runner only: the second one's claim fails and it retries after the lease.
        broker_transport_options={"visibility_timeout": max(2 * lease_s, 60.0)},
    )
    return app


def dispatcher(app: Celery) -> Dispatch:
    """Send each job to the workers as a `RUN_JOB` task."""

    async def dispatch(job_id: str) -> None:
        try:
            await asyncio.to_thread(app.send_task, RUN_JOB, args=[job_id], queue=QUEUE)
        except Exception as error:  # the broker is down: the job stays queued, for the workers' sweep
            log.warning("job %s waits for a worker's sweep: dispatching it failed (%s)", job_id, error)

    return dispatch


class _Loop:
    """An asyncio event loop on a thread of its own, for the worker's services while Celery holds the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="worker-services", daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def run_worker(settings: Settings) -> None:
    """Run a Celery worker of the jobs (`tritonrag worker`) until it is stopped: the services an orchestrator has
    (a Triton pool, the shared store), without its APIs or roll-outs, running each `RUN_JOB` task's job."""
    from tritonrag.server.app import running_services  # the services import this module

    if not settings.ingest.broker_url or not settings.store.url:
        raise ValueError("a worker needs ingest.broker_url and store.url (the shared store)")
    settings = settings.model_copy(update={"rollout": settings.rollout.model_copy(update={"enabled": False})})
    app = celery_app(settings)
    loop = _Loop()
    services_context = running_services(settings, worker=True)
    services = loop.call(services_context.__aenter__())

    @app.task(name=RUN_JOB, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def run_job(task: Task[Any, Any], job_id: str) -> None:
        jobs = services.collections.jobs
        if loop.call(jobs.run_job(job_id)):
            return
        if not loop.call(jobs.finished(job_id)):  # another runner holds it: look again once its lease may be over
            raise task.retry(countdown=settings.ingest.job_lease_s)

    try:
        worker = app.Worker(
            pool="solo",  # one task at a time: a job pipelines its own batches, and the services are not forked
            concurrency=1,
            queues=[QUEUE],
            hostname=f"tritonrag-{socket.gethostname()}-{os.getpid()}",
            loglevel="INFO",
        )
        worker.start()
    finally:
        loop.call(services_context.__aexit__(None, None, None))
        loop.stop()
