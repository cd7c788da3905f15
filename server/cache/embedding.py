"""``CachedEmbedding``: the ``Embedding`` stage with a cache per text, for searches and ingestion alike.

Queries go to the ``query_embedding`` tier, chunks (``bulk``, ingestion) to ``chunk_embedding``:
re-ingesting unchanged text embeds nothing. The texts that neither level has are embedded in one
call, which identical misses in flight share. Vectors are stored as their float32 bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from functools import partial

import numpy as np

from tritonrag.clients.wire.schema import ModelVersion

from ..errors import UnavailableError
from ..retrieval.stages import Embedding, Vectors
from ..routing.triton_pool import TritonPool
from ..services.models import ModelService
from .flight import Flight
from .keys import Keys, Tier
from .levels import TwoLevelCache

_FLOAT32 = np.dtype("<f4")


class CachedEmbedding(Embedding):
    """Texts → vectors as ``Embedding``, each text looked up first by (embedder, version, sha256 of the text)."""

    def __init__(self, pool: TritonPool, cache: TwoLevelCache, keys: Keys, models: ModelService) -> None:
        super().__init__(pool)
        self._cache = cache
        self._keys = keys
        self._models = models

    async def run(
        self, texts: Sequence[str], request_id: str | None = None, *, bulk: bool = False, version: str | None = None
    ) -> Vectors:
        tier: Tier = "chunk_embedding" if bulk else "query_embedding"
        if not texts or not self._cache.enabled(tier):
            return await super().run(texts, request_id, bulk=bulk, version=version)
        if version is None:
            try:
                version = (await self._models.version(self._models.names.embedder)).version
            except UnavailableError:  # not served: fails as an uncached call does
                return await super().run(texts, request_id, bulk=bulk)
        model = ModelVersion(name=self._models.names.embedder, version=version)
        keys = [self._keys.embedding(tier, model, text) for text in texts]
        texts_by_key = dict(zip(keys, texts, strict=True))
        found = await self._cache.get_many(tier, list(texts_by_key))
        vectors = {key: np.frombuffer(value, dtype=_FLOAT32) for key, (value, _) in found.items()}
        flights: dict[int, Flight[dict[str, Vectors]]] = {}
        new = []
        for key in (key for key in texts_by_key if key not in vectors):
            flight = self._cache.flights.join(key)
            if flight is None:
                new.append(key)
            else:
                self._cache.coalesced(tier)
                flights[id(flight)] = flight
        if new:
            source = self._embed([texts_by_key[key] for key in new], new, request_id, bulk, version)
            flight = self._cache.flights.start(new, source, partial(self._store, tier))
            flights[id(flight)] = flight
        for computed in await asyncio.gather(*(flight.result() for flight in flights.values())):
            vectors.update(computed)
        return np.stack([vectors[key] for key in keys])

    async def _embed(
        self, texts: list[str], keys: list[str], request_id: str | None, bulk: bool, version: str
    ) -> AsyncGenerator[dict[str, Vectors]]:
        """One item: the vector of each text, by its key."""
        matrix = await super().run(texts, request_id, bulk=bulk, version=version)
        yield dict(zip(keys, matrix, strict=True))

    async def _store(self, tier: Tier, items: list[dict[str, Vectors]]) -> None:
        [computed] = items
        await self._cache.put_many(tier, [(key, vector.astype(_FLOAT32).tobytes()) for key, vector in computed.items()])
