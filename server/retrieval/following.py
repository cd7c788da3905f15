"""Keeping a replica's collections at a shared store's latest revision.

Every orchestrator replica over a shared PostgreSQL store keeps derived indexes of its own; this loop brings
its open collections to the store's revision log. A committed write notifies ``LISTEN``ers
(`REVISIONS_CHANNEL`), which wakes the loop at once; without a notification (a dropped listener
connection, a notification lost while reconnecting) it reads the log every ``interval_s`` anyway, which
bounds how stale a search can be. A client that must read its own write passes the revision the write
returned (``min_revision``), and the collection follows up to it on the spot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg
from sqlalchemy import make_url

from tritonrag.server.store.documents import REVISIONS_CHANNEL

log = logging.getLogger(__name__)

Follow = Callable[[set[str] | None], Awaitable[None]]
"""``follow(schemas)``: bring the open collections whose stores are ``schemas`` (every one when None) up to date."""


async def follow_store(follow: Follow, url: str, interval_s: float) -> None:
    """Call ``follow`` (`CollectionRegistry.follow_all`) with the stores whose writes the shared store at ``url``
    (an SQLAlchemy PostgreSQL URL) notifies, and with None (every store) every ``interval_s`` at least, until
    cancelled."""
    listener: psycopg.AsyncConnection[object] | None = None
    last_round = time.monotonic()
    try:
        while True:
            if listener is None or listener.closed:
                listener = await _listen(url)
            notified = await _wait(listener, interval_s)
            if time.monotonic() - last_round >= interval_s:
                notified, last_round = None, time.monotonic()
            try:
                await follow(notified)
            except Exception:  # the store unreachable for a while: searches go on at the last revision
                log.exception("following the store failed; trying again in %g s", interval_s)
    finally:
        if listener is not None:
            await listener.close()


async def _listen(url: str) -> psycopg.AsyncConnection[object] | None:
    """A connection that ``LISTEN``s on the revisions channel; None when the database cannot be reached now (the
    loop polls meanwhile and tries again)."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await connection.execute(f"LISTEN {REVISIONS_CHANNEL}")
    except psycopg.Error as error:
        log.warning("cannot listen for the store's writes (%s); reading its log every interval instead", error)
        return None
    return connection


async def _wait(listener: psycopg.AsyncConnection[object] | None, interval_s: float) -> set[str] | None:
    """The stores (schemas) of the first write notified, or None when ``interval_s`` passes without one."""
    if listener is None:
        await asyncio.sleep(interval_s)
        return None
    try:
        async for notification in listener.notifies(timeout=interval_s, stop_after=1):
            return {notification.payload}
    except psycopg.Error as error:
        log.warning("the store's notifications stopped (%s); reconnecting", error)
        with contextlib.suppress(psycopg.Error):
            await listener.close()
    return None
