"""``CollectionRegistry``: the collections of a data directory, each opened once and shared by every service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from tritonrag.clients.wire.schema import CollectionCreate, ModelVersion

from ..config import IndexSettings
from ..security.principal import DEFAULT_TENANT
from ..security.tenancy import SEPARATOR, collection_key
from ..store.catalog import Catalog
from ..store.database import schema_name
from .collection import Collection
from .following import follow_store

log = logging.getLogger(__name__)


class CollectionRegistry:
    """Open collections by key (``<tenant>/<name>``, ``security.tenancy``); the catalog says which exist,
    ``<data_dir>/collections/<tenant>/<name>`` holds each.

    ``dimension`` is asked only for a collection that has no vectors yet: an existing collection opens
    with the width it stored, so it opens (and BM25 search works) while the embedder is down.

    The embedder version a collection is pinned to lives in its store (with its vectors, so that a re-index's
    switch changes both at once) and in the catalog (for listings without opening a collection); when a
    collection opens, a store without a pin takes the catalog's, and the catalog follows the store's.
    """

    def __init__(
        self,
        data_dir: Path,
        catalog: Catalog,
        index: IndexSettings,
        dimension: Callable[[], Awaitable[int]],
        follow_interval_s: float = 1.0,
        *,
        follow: bool = True,
    ) -> None:
        self.catalog = catalog
        self.location = catalog.location  # where the stores are: files under data_dir, or the shared database
        self._root = data_dir / "collections"
        self._index = index
        self._dimension = dimension
        self._open: dict[str, Collection] = {}
        self._created_at: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._follow_interval_s = follow_interval_s
        self._follow = follow
        self._following: asyncio.Task[None] | None = None
        self._adopt_untenanted()

    def _adopt_untenanted(self) -> None:
        """Collections from before tenants (a key without ``/``) become the default tenant's: the directory
        moves first, then the catalog, so a crash between the two is finished at the next start."""
        for name in self.catalog.list_collections():
            if SEPARATOR in name:
                continue
            key = collection_key(DEFAULT_TENANT, name)
            if self._directory(name).exists() and not self._directory(key).exists():
                self._directory(key).parent.mkdir(parents=True, exist_ok=True)
                self._directory(name).rename(self._directory(key))
            self.catalog.rename_collection(name, key)

    def _directory(self, name: str) -> Path:
        return self._root / name

    async def get(self, name: str) -> Collection:
        """The open collection ``name``; ``NotFoundError`` when the catalog has none of that name."""
        return await self._get(name)

    async def _get(self, name: str, dimension: int | None = None) -> Collection:
        """The open collection ``name``, opened with ``dimension`` (default: ``dimension()``) if it has no store."""
        collection = self._open.get(name)
        if collection is not None:
            return collection
        async with self._lock:
            if name not in self._open:
                spec = await asyncio.to_thread(self.catalog.get_collection, name)
                stored = await asyncio.to_thread(
                    Collection.stored_dimension, self._directory(name), name, self.location
                )
                width = stored or dimension or await self._dimension()
                self._created_at[name] = await asyncio.to_thread(self.catalog.collection_created_at, name)
                collection = await asyncio.to_thread(self._open_collection, name, spec, width)
                await asyncio.to_thread(self._sync_pin, name, collection)
                self._open[name] = collection
            return self._open[name]

    def _sync_pin(self, name: str, collection: Collection) -> None:
        """The store's pin wins (it is committed with the vectors); a store without one takes the catalog's."""
        recorded = self.catalog.collection_embedder(name)
        if collection.embedder is None and recorded is not None:
            collection.pin(recorded)
        elif collection.embedder is not None and collection.embedder != recorded:
            self.catalog.pin_collection(name, collection.embedder)

    async def pin(self, name: str, embedder: ModelVersion) -> ModelVersion:
        """Pin the collection ``name`` to ``embedder`` unless it is pinned already, and record its pin in the
        catalog; returns the version it is pinned to."""
        collection = await self.get(name)
        pinned = await asyncio.to_thread(collection.pin, embedder)
        await asyncio.to_thread(self.catalog.pin_collection, name, pinned)
        return pinned

    async def revision(self, name: str) -> tuple[float, int]:
        """When ``name`` was created, and its write revision: together they name what it holds (a collection created
        again under the same name counts its revisions from 0 again); ``NotFoundError`` when there is none."""
        collection = await self.get(name)
        return self._created_at[name], collection.revision

    def _open_collection(self, name: str, spec: CollectionCreate, dimension: int) -> Collection:
        index = self._index
        return Collection.open(
            self._directory(name),
            spec,
            dimension,
            dense_params=index.dense,
            snapshot_interval_s=index.snapshot_interval_s,
            location=self.location,
        )

    def opened(self) -> list[Collection]:
        """The collections opened so far (each is opened at its first use); callable from any thread."""
        return list(self._open.values())

    async def create(
        self, spec: CollectionCreate, embedder: ModelVersion | None = None, dimension: int | None = None
    ) -> Collection:
        """Record a new collection in the catalog, pinned to ``embedder`` (whose vectors are ``dimension`` wide)
        when given, and open it; ``AlreadyExistsError`` when the name is taken."""
        await asyncio.to_thread(self.catalog.create_collection, spec, embedder)
        return await self._get(spec.name, dimension)

    async def names(self) -> list[str]:
        """Every collection's name, in the catalog's order."""
        return await asyncio.to_thread(self.catalog.list_collections)

    async def delete(self, name: str) -> None:
        """Close and forget a collection, and delete its files; ``NotFoundError`` when it does not exist."""
        collection = await self.get(name)
        async with self._lock:
            self._open.pop(name, None)
            self._created_at.pop(name, None)
            await asyncio.to_thread(collection.close)
            await asyncio.to_thread(collection.drop_store)
            await asyncio.to_thread(self.catalog.delete_collection, name)
            await asyncio.to_thread(shutil.rmtree, self._directory(name), True)

    async def start(self) -> None:
        """Over a shared store: open every collection (so that this replica is ready only once its indexes are
        built) and start following the store (`following.follow_store`). Nothing to do over local files, or when
        told not to ``follow`` (a worker's registry, which serves no searches)."""
        if not (self.location.shared and self._follow) or self._following is not None:
            return
        await self.open_all()
        self._following = asyncio.create_task(
            follow_store(self.follow_all, self.location.url, self._follow_interval_s), name="store-follower"
        )

    async def open_all(self) -> None:
        """Open every collection of the catalog: each builds (or brings up to date) its derived indexes."""
        for name in await self.names():
            await self.get(name)

    async def follow_all(self, schemas: set[str] | None = None) -> None:
        """Bring each open collection (of those whose stores are ``schemas``, when given: the notified writes) to its
        store's latest revision (`Collection.follow`); in a round of them all, close and forget here the collections
        that another process deleted or created again."""
        created = await asyncio.to_thread(self.catalog.creation_times) if schemas is None else {}
        for name, collection in list(self._open.items()):
            if schemas is not None and schema_name(name) not in schemas:
                continue
            if schemas is None and created.get(name) != self._created_at.get(name):
                await self._forget(name, collection)
                continue
            try:
                await asyncio.to_thread(collection.follow)
            except Exception:  # e.g. its store dropped between the two reads: the next round forgets it
                log.exception("following collection %s failed", name)

    async def _forget(self, name: str, collection: Collection) -> None:
        """Close ``collection`` and delete its derived indexes here; its store is another process's business."""
        async with self._lock:
            if self._open.get(name) is collection:
                self._open.pop(name)
                self._created_at.pop(name, None)
                await asyncio.to_thread(collection.close)
                await asyncio.to_thread(shutil.rmtree, self._directory(name), True)

    async def close(self) -> None:
        """Stop following the store; close every open collection (writing index snapshots)."""
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
            self._following = None
        for collection in self._open.values():
            await asyncio.to_thread(collection.close)
        self._open.clear()
