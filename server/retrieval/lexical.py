"""`LexicalIndex`: BM25 over chunk texts, by tantivy (a Rust search library, through its Python bindings).

The index lives in a directory of its own beside the collection's store and is derived from it: each
write commits to tantivy after the store's commit, and a missing, unreadable or stale index is brought
back to the store's chunk ids (`Collection` reconciles by id; chunk ids are never reused). Texts are
analysed per collection: the simple tokenizer, lower-casing, and for a language the Snowball stemmer
and that language's stop words where tantivy has them (``none``: neither). Scores are tantivy's BM25
(k1 1.2, b 0.75), plus the query's words as an exact phrase: a text that holds the query word for word (a
pasted sentence or error message) scores that phrase's BM25 on top of its words'; `holds_phrase` tells
whether any text does (the search then fuses with its ``verbatim`` weights). Filters arrive as the allowed
chunk ids and restrict the matching documents before the top-k cut.

Chosen over SQLite FTS5 and the earlier hand-written index by measurement (docs/BENCHMARKS.md,
"Lexical indexes"): stemming and stop words, block-max WAND top-k, segments on disk, deletes by term.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tantivy

from tritonrag.clients.wire.schema import Language
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.store.documents import IdArray

_ID, _TEXT, _ANALYZER = "chunk_id", "text", "collection"
# Query syntax is not offered: a query is words, so every character that could be an operator goes.
_NOT_A_WORD = re.compile(r"[^\w]+")
_MAX_TOKEN_CHARS = 40  # longer tokens (hashes, base64) are dropped, as Lucene's standard analyzer does
_WRITER_HEAP_BYTES = 32_000_000
_WRITER_WAIT_S = 30.0
# A phrase of fewer words than this is common by chance ("thread pool"); one of more, found in a text, is
# most likely copied from it (docs/BENCHMARKS.md, "Retrieval quality").
VERBATIM_MIN_TERMS = 3


class LexicalIndexError(Exception):
    """The index directory holds no usable index (another schema, or damaged files)."""


def _words(query: str) -> str:
    """The query's words, lower-cased, one space apart: what is left once operator characters go."""
    return _NOT_A_WORD.sub(" ", query).lower().strip()


def _analyzer(language: Language) -> Any:
    builder = (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(_MAX_TOKEN_CHARS))
        .filter(tantivy.Filter.lowercase())
    )
    if language is not Language.none:
        if _has_stop_words(language):
            builder = builder.filter(tantivy.Filter.stopword(language.value))
        builder = builder.filter(tantivy.Filter.stemmer(language.value))
    return builder.build()


def _has_stop_words(language: Language) -> bool:
    """Whether tantivy has stop words of ``language``: it stems Arabic, Greek, Romanian, Tamil and Turkish, but
    has no stop words of them (and a builder that refused a filter is spent, so it is asked on one of its own)."""
    try:
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.stopword(language.value))
    except ValueError:
        return False
    return True


def _schema() -> Any:
    builder = tantivy.SchemaBuilder()
    builder.add_integer_field(_ID, stored=False, indexed=True, fast=True)
    builder.add_text_field(_TEXT, stored=False, tokenizer_name=_ANALYZER)
    return builder.build()


class LexicalIndex:
    """BM25 by chunk id. `write` makes a change durable and `refresh` makes searches see it; writes are
    serialised by the caller, and searches run concurrently with them and with each other.

    A write takes tantivy's writer lock for its own duration only, so another process may write the
    same directory between two writes (its changes are searched here after the next `refresh`).
    """

    def __init__(self, directory: Path, language: Language) -> None:
        """Open the index in ``directory``, or create an empty one; `LexicalIndexError` if it is unusable."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.language = language
        try:
            exists = tantivy.Index.exists(str(directory))
            self._index = tantivy.Index.open(str(directory)) if exists else tantivy.Index(_schema(), str(directory))
        except ValueError as exc:
            raise LexicalIndexError(f"{directory}: {exc}") from exc
        self._schema = self._index.schema
        self._analyzer = _analyzer(language)
        self._index.register_tokenizer(_ANALYZER, self._analyzer)
        self.refresh()

    @classmethod
    def open_or_empty(cls, directory: Path, language: Language) -> LexicalIndex:
        """The index in ``directory``; an empty one in its place when what is there cannot be read."""
        try:
            return cls(directory, language)
        except LexicalIndexError:
            shutil.rmtree(directory, ignore_errors=True)
            return cls(directory, language)

    def __len__(self) -> int:
        return int(self._searcher.num_docs)

    def ids(self) -> IdArray:
        """The ids searches see, ascending."""
        hits = self._searcher.search(tantivy.Query.all_query(), max(1, len(self)), count=False).hits
        values = self._searcher.fast_field_values(_ID, [address for _, address in hits])
        return np.sort(np.asarray(values, np.int64))

    # --- writes -------------------------------------------------------------------------------

    def write(self, removed: IdArray, added: IdArray, texts: Sequence[str]) -> None:
        """Remove chunk ids ``removed`` (absent ones are ignored) and index ``texts`` under new chunk ids
        ``added``, durably; searches see it after `refresh`. Tens of ms of file syncs (merges too, now
        and then); the GIL is released meanwhile."""
        writer = self._writer()
        try:
            if len(removed):
                writer.delete_documents_by_query(self._id_query(removed))
            for chunk_id, text in zip(added.tolist(), texts, strict=True):
                writer.add_document(tantivy.Document(**{_ID: chunk_id, _TEXT: text}))
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
        finally:
            writer.wait_merging_threads()  # the merges this commit started, then the lock goes

    def refresh(self) -> None:
        """Make searches see the last commit (a fraction of a millisecond)."""
        self._index.reload()
        self._searcher = self._index.searcher()

    def _writer(self) -> Any:
        """tantivy's writer, once another process's write of this directory is over."""
        deadline = time.monotonic() + _WRITER_WAIT_S
        while True:
            try:
                return self._index.writer(heap_size=_WRITER_HEAP_BYTES, num_threads=1)
            except ValueError:  # LockBusy: another process writes
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    # --- reads --------------------------------------------------------------------------------

    def search(self, query: str, k: int, allowed: IdArray | None = None) -> tuple[npt.NDArray[np.float32], IdArray]:
        """Up to ``k`` ``(scores, ids)`` by BM25, best first (ties by id), among ``allowed`` ids when given."""
        if k < 1:
            raise InvalidArgumentError("k must be at least 1", field="top_k")
        words = _words(query)
        if not words or (allowed is not None and not len(allowed)):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        try:
            parsed = self._index.parse_query(words, [_TEXT])
        except ValueError:  # nothing left to match once the analyzer is done (stop words only)
            return np.empty(0, np.float32), np.empty(0, np.int64)
        if len(self._analyzer.analyze(words)) > 1:  # the phrase adds its score where the words come in order
            phrase = self._index.parse_query(f'"{words}"', [_TEXT])
            parsed = tantivy.Query.boolean_query([(tantivy.Occur.Should, parsed), (tantivy.Occur.Should, phrase)])
        searcher = self._searcher
        hits = searcher.search(self._among(parsed, allowed), k, count=False).hits
        scores = np.asarray([score for score, _ in hits], np.float32)
        ids = np.asarray(searcher.fast_field_values(_ID, [address for _, address in hits]), np.int64)
        order = np.lexsort((ids, -scores))
        return scores[order], ids[order]

    def holds_phrase(self, query: str, allowed: IdArray | None = None, min_terms: int = VERBATIM_MIN_TERMS) -> bool:
        """Whether some text (among ``allowed`` ids when given) holds the query's words in order, at least
        ``min_terms`` of them once the analyzer is done (stop words leave gaps: "the" matches any one word)."""
        words = _words(query)
        if len(self._analyzer.analyze(words)) < min_terms or (allowed is not None and not len(allowed)):
            return False
        phrase = self._index.parse_query(f'"{words}"', [_TEXT])
        return bool(self._searcher.search(self._among(phrase, allowed), 1, count=False).hits)

    def _among(self, query: Any, allowed: IdArray | None) -> Any:
        """``query`` restricted to the ``allowed`` ids (all when ``None``), their scores unchanged."""
        if allowed is None:
            return query
        only = tantivy.Query.const_score_query(self._id_query(allowed), 0.0)
        return tantivy.Query.boolean_query([(tantivy.Occur.Must, query), (tantivy.Occur.Must, only)])

    def _id_query(self, ids: IdArray) -> Any:
        return tantivy.Query.term_set_query(self._schema, _ID, [int(i) for i in ids])
