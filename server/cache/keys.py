"""Cache keys: ``<prefix>:<tier>:<sha256 of a canonical JSON>`` of every part that changes a result.

A search's, an answer's or a chat's parts: the request itself (every field, but the ones that change
nothing: ``use_cache``, ``stream``, and ``min_revision``, which the collection's revision supersedes), the
versions of the models it involves, the collection's creation time and write revision, and the settings and
release that change results. An embedding's: the model, its version and the sha256 of the text, exactly as
given (normalising it is the tokenizer's business: any other normalisation could join two texts that the
model embeds differently).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any, Literal, get_args

from tritonrag.clients.wire.schema import (
    ChatMessage,
    Grounding,
    ModelVersion,
    QueryRequest,
    SamplingParams,
    SearchMode,
    SearchRequest,
)

from ..config import IndexSettings, QuerySettings
from ..errors import UnavailableError
from ..retrieval.registry import CollectionRegistry
from ..services.models import ModelService

Tier = Literal["query_embedding", "chunk_embedding", "search", "answer", "chat"]
TIERS: tuple[Tier, ...] = get_args(Tier)


def canonical(parts: Mapping[str, Any]) -> bytes:
    """One byte string per value: keys sorted, no spaces, UTF-8."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def make_key(prefix: str, tier: Tier, parts: Mapping[str, Any]) -> str:
    return f"{prefix}:{tier}:{hashlib.sha256(canonical(parts)).hexdigest()}"


def deterministic(params: SamplingParams) -> bool:
    """Whether a generation with ``params`` can be cached: greedy, or sampled with a seed."""
    return params.temperature == 0 or params.seed is not None


class Keys:
    """The key of each tier's request, with what it reads of the collections and the served models.

    A key is None when a model it involves is not served now: such a request runs uncached (and degraded).
    """

    def __init__(
        self,
        prefix: str,
        registry: CollectionRegistry,
        models: ModelService,
        index: IndexSettings,
        query: QuerySettings,
    ) -> None:
        self.prefix = prefix
        self._registry = registry
        self._models = models
        self._names = models.names
        # What else changes results: the retrieval's parameters, the answers' default budget, the code's release.
        self._settings = {
            "index": index.model_dump(mode="json"),
            "query": query.model_dump(mode="json"),
            "release": metadata.version("tritonrag"),
        }

    def embedding(self, tier: Tier, model: ModelVersion, text: str) -> str:
        text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        return make_key(self.prefix, tier, {"model": model.name, "version": model.version, "text": text_sha256})

    async def search(self, request: SearchRequest) -> str | None:
        models = self._retrieval_models(request.mode, request.rerank)
        parts = request.model_dump(mode="json", exclude={"use_cache", "min_revision"})
        return await self._key("search", request.collection, models, parts)

    async def answer(self, request: QueryRequest) -> str | None:
        models = [*self._retrieval_models(request.mode, request.rerank), self._names.generator]
        parts = request.model_dump(mode="json", exclude={"use_cache", "stream", "min_revision"})
        return await self._key("answer", request.collection, models, parts)

    async def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, grounding: Grounding) -> str | None:
        models = [*self._retrieval_models(grounding.mode, grounding.rerank), self._names.generator]
        parts = {
            "messages": [m.model_dump(mode="json") for m in messages],
            "sampling": params.model_dump(mode="json"),
            "grounding": grounding.model_dump(mode="json"),
        }
        return await self._key("chat", grounding.collection, models, parts)

    def _retrieval_models(self, mode: SearchMode, rerank: bool) -> list[str]:
        return [
            *([self._names.embedder] if mode != SearchMode.sparse else []),
            *([self._names.reranker] if rerank else []),
        ]

    async def _key(self, tier: Tier, collection: str, models: list[str], request: dict[str, Any]) -> str | None:
        created_at, revision = await self._registry.revision(collection)
        try:
            versions = {name: (await self._models.version(name)).version for name in models}
        except UnavailableError:
            return None
        parts = {
            "request": request,
            "collection": {"name": collection, "created_at": created_at, "revision": revision},
            "models": versions,
            "settings": self._settings,
        }
        return make_key(self.prefix, tier, parts)
