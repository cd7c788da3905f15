"""``ModelService``: the models Triton serves, their versions, and what the orchestrator reads of each version.

The tokenizer of an embedder version (chunking, token counts) and the context window of a generator
version (packing) are read from the model repository that Triton serves, once per version.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

from tritonrag.clients.wire.schema import Chunking, Embeddings, ModelVersion
from tritonrag.export.runtime.contract import TOKENIZER_FILE
from tritonrag.export.runtime.encoding import ModelTokenizer

from ..config import ModelSettings
from ..errors import UnavailableError
from ..generation.packing import ContextWindow
from ..ingest.chunking import Chunker
from ..routing.triton_pool import TritonPool

_T = TypeVar("_T")


def served_version_dir(repository: Path, model: ModelVersion) -> Path:
    """The served version's folder in the model repository (its ``tokenizer.json``, for chunking).

    The orchestrator runs beside Triton on the same repository in the embedded setup.
    """
    version_dir = repository / model.name / model.version
    if not (version_dir / TOKENIZER_FILE).is_file():
        raise UnavailableError(
            f"{model.name} version {model.version} has no {TOKENIZER_FILE} under {repository}; "
            f"the orchestrator needs the model repository Triton serves from"
        )
    return version_dir


class ModelService:
    """Served models and versions, with each version's tokenizer, chunkers and context window read once."""

    def __init__(self, pool: TritonPool, repository: Path, names: ModelSettings) -> None:
        self.names = names
        self._pool = pool
        self._repository = repository
        self._loaded: dict[tuple[str, str, object], object] = {}
        self._dimensions: dict[str, int] = {}

    async def version(self, name: str) -> ModelVersion:
        """The version of ``name`` new work goes to (the route's stable version, or the newest Triton serves);
        ``UnavailableError`` when no endpoint serves it."""
        return await self._pool.model_version(name)

    async def served_models(self) -> list[ModelVersion]:
        """The version of each model (embedder, reranker, generator) that Triton serves ready now."""
        served = []
        for name in (self.names.embedder, self.names.reranker, self.names.generator):
            with contextlib.suppress(UnavailableError):
                served.append(await self.version(name))
        return served

    async def _per_version(self, name: str, key: object, load: Callable[[Path], _T], version: str | None = None) -> _T:
        """``load(version_dir)`` of ``version`` of ``name`` (default: the one new work goes to), computed once per
        (version, ``key``)."""
        model = await self.version(name) if version is None else ModelVersion(name=name, version=version)
        cache_key = (name, model.version, key)
        if cache_key not in self._loaded:
            version_dir = served_version_dir(self._repository, model)
            self._loaded[cache_key] = await asyncio.to_thread(load, version_dir)
        return cast(_T, self._loaded[cache_key])  # stored by this method, with this key, from ``load``

    async def chunker(self, chunking: Chunking, version: str | None = None) -> Chunker:
        """A chunker on the tokenizer of embedder ``version`` (default: the version new work goes to)."""
        tokens, overlap = chunking.chunk_tokens, chunking.overlap_tokens
        return await self._per_version(
            self.names.embedder,
            ("chunker", tokens, overlap),
            lambda d: Chunker.from_version_dir(d, tokens, overlap),
            version,
        )

    async def context_window(self) -> ContextWindow:
        """The context window of the generator version Triton serves now; ``UnavailableError`` when none is."""
        return await self._per_version(self.names.generator, "window", ContextWindow.from_version_dir)

    async def served_window(self) -> ContextWindow | None:
        """``context_window``, or None when no endpoint serves the generator."""
        try:
            return await self.context_window()
        except UnavailableError:
            return None

    async def embedding_dimension(self, version: str | None = None) -> int:
        """The width of embedder ``version``'s vectors (default: the version new work goes to), asked of Triton
        once per version."""
        version = version or (await self.version(self.names.embedder)).version
        if version not in self._dimensions:
            vectors = await self._pool.embed(["dimension probe"], version=version)
            self._dimensions[version] = int(vectors.shape[1])
        return self._dimensions[version]

    async def embed(self, texts: Sequence[str], request_id: str | None = None) -> Embeddings:
        """Vectors of ``texts`` from the embedder's stable version, and the tokens it read (truncated as it does)."""
        version = await self.version(self.names.embedder)
        vectors = await self._pool.embed(texts, request_id=request_id, version=version.version)
        tokenizer = await self._per_version(
            self.names.embedder, "tokenizer", ModelTokenizer.from_version_dir, version.version
        )
        tokens = sum(len(tokenizer.encode_text(text).ids) for text in texts)
        return Embeddings(model=version, vectors=vectors.tolist(), prompt_tokens=tokens)
