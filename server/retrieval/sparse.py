"""`SparseIndex`: BM25 over chunk texts, an inverted index kept in memory and snapshotted to disk.

Each chunk gets a slot; a term's postings list the slots it occurs in with its frequency.
Removing a chunk clears its slot's live flag (postings are filtered at query time) and the
index compacts itself once dead slots outnumber live ones. Scores are Lucene's BM25
(``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``) with statistics over the live chunks.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tritonrag.server.config import Bm25Params
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.retrieval.snapshot import (
    PayloadReader,
    PayloadWriter,
    SnapshotError,
    read_snapshot,
    snapshot_revision,
    write_snapshot,
)
from tritonrag.server.store.documents import IdArray

_TOKEN = re.compile(r"\w+")
_MIN_DEAD_TO_COMPACT = 1024


def tokenize(text: str) -> list[str]:
    """Case-folded word tokens (Unicode ``\\w+``)."""
    return _TOKEN.findall(text.casefold())


class SparseIndex:
    """BM25 by chunk id. Not thread-safe for writes: callers serialise writes against everything else."""

    def __init__(self, params: Bm25Params | None = None) -> None:
        """An empty index."""
        self.params = params or Bm25Params()
        self._vocab: dict[str, int] = {}
        self._post_slots: list[array[int]] = []
        self._post_tfs: list[array[int]] = []
        self._slots = 0
        self._slot_ids = np.empty(0, np.int64)
        self._doc_len = np.empty(0, np.float32)
        self._alive = np.empty(0, bool)
        self._live = 0
        self._total_len = 0.0

    def __len__(self) -> int:
        return self._live

    def ids(self) -> IdArray:
        """The ids in the index, ascending."""
        return np.sort(self._slot_ids[: self._slots][self._alive[: self._slots]])

    # --- writes -------------------------------------------------------------------------------

    def add(self, ids: IdArray, texts: Sequence[str]) -> None:
        """Index ``texts`` under new chunk ``ids``."""
        self._reserve(self._slots + len(ids))
        for chunk_id, text in zip(ids.tolist(), texts, strict=True):
            slot = self._slots
            counts = Counter(tokenize(text))
            for term, tf in counts.items():
                term_id = self._vocab.setdefault(term, len(self._vocab))
                if term_id == len(self._post_slots):
                    self._post_slots.append(array("q"))
                    self._post_tfs.append(array("i"))
                self._post_slots[term_id].append(slot)
                self._post_tfs[term_id].append(tf)
            length = sum(counts.values())
            self._slot_ids[slot], self._doc_len[slot], self._alive[slot] = chunk_id, length, True
            self._slots += 1
            self._live += 1
            self._total_len += length

    def remove(self, ids: IdArray) -> None:
        """Remove chunk ``ids``; ids not in the index are ignored."""
        if not len(ids):
            return
        gone = np.isin(self._slot_ids[: self._slots], ids) & self._alive[: self._slots]
        self._alive[: self._slots][gone] = False
        self._live -= int(gone.sum())
        self._total_len -= float(self._doc_len[: self._slots][gone].sum())
        dead = self._slots - self._live
        if dead > max(_MIN_DEAD_TO_COMPACT, self._live):
            self._compact()

    def _reserve(self, slots: int) -> None:
        if slots <= len(self._slot_ids):
            return
        capacity = max(slots, 2 * len(self._slot_ids), 1024)
        self._slot_ids = np.resize(self._slot_ids, capacity)
        self._doc_len = np.resize(self._doc_len, capacity)
        self._alive = np.resize(self._alive, capacity)
        self._alive[self._slots :] = False

    def _compact(self) -> None:
        """Drop dead slots and the terms that only they held."""
        keep = self._alive[: self._slots]
        new_slot = np.cumsum(keep, dtype=np.int64) - 1
        vocab: dict[str, int] = {}
        post_slots: list[array[int]] = []
        post_tfs: list[array[int]] = []
        for term, term_id in self._vocab.items():
            slots = np.array(self._post_slots[term_id], np.int64)
            live = keep[slots]
            if live.any():
                vocab[term] = len(post_slots)
                post_slots.append(array("q", new_slot[slots[live]].tobytes()))
                post_tfs.append(array("i", np.array(self._post_tfs[term_id], np.int32)[live].tobytes()))
        self._vocab, self._post_slots, self._post_tfs = vocab, post_slots, post_tfs
        self._slot_ids = self._slot_ids[: self._slots][keep]
        self._doc_len = self._doc_len[: self._slots][keep]
        self._alive = np.ones(len(self._slot_ids), bool)
        self._slots = len(self._slot_ids)

    # --- reads --------------------------------------------------------------------------------

    def search(self, query: str, k: int, allowed: IdArray | None = None) -> tuple[npt.NDArray[np.float32], IdArray]:
        """Up to ``k`` ``(scores, ids)`` by BM25, best first, among ``allowed`` ids when given."""
        if k < 1:
            raise InvalidArgumentError("k must be at least 1", field="top_k")
        term_ids = {self._vocab[term] for term in set(tokenize(query)) if term in self._vocab}
        if not term_ids or not self._live:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        k1, b = self.params.k1, self.params.b
        avg_len = self._total_len / self._live
        slot_parts, score_parts = [], []
        for term_id in term_ids:
            slots = np.array(self._post_slots[term_id], np.int64)
            tfs = np.array(self._post_tfs[term_id], np.float32)
            live = self._alive[slots]
            slots, tfs = slots[live], tfs[live]
            if not len(slots):
                continue
            idf = np.log1p((self._live - len(slots) + 0.5) / (len(slots) + 0.5))
            norm = k1 * (1.0 - b + b * self._doc_len[slots] / avg_len)
            slot_parts.append(slots)
            score_parts.append(idf * tfs * (k1 + 1.0) / (tfs + norm))
        if not slot_parts:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        slots, inverse = np.unique(np.concatenate(slot_parts), return_inverse=True)
        scores = np.bincount(inverse, weights=np.concatenate(score_parts)).astype(np.float32)
        ids = self._slot_ids[slots]
        if allowed is not None:
            passing = np.isin(ids, allowed)
            ids, scores = ids[passing], scores[passing]
        if len(ids) > k:
            best = np.argpartition(-scores, k - 1)[:k]
            ids, scores = ids[best], scores[best]
        order = np.lexsort((ids, -scores))
        return scores[order], ids[order]

    # --- snapshots ----------------------------------------------------------------------------

    def save(self, path: Path, revision: int) -> None:
        """Write a snapshot that records the store ``revision`` it reflects."""
        terms = list(self._vocab)  # dicts keep insertion order, which is term-id order
        lengths = np.array([len(self._post_slots[self._vocab[term]]) for term in terms], np.int64)
        arrays = [
            np.frombuffer("\n".join(terms).encode(), np.uint8),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.concatenate([np.empty(0, np.int64), *(np.array(p, np.int64) for p in self._post_slots)]),
            np.concatenate([np.empty(0, np.int32), *(np.array(p, np.int32) for p in self._post_tfs)]),
            self._slot_ids[: self._slots],
            self._doc_len[: self._slots],
            self._alive[: self._slots],
        ]

        def write(stream: PayloadWriter) -> None:
            for item in arrays:
                np.save(stream, item, allow_pickle=False)

        write_snapshot(path, {"revision": revision, "count": self._live}, write)

    @classmethod
    def load(cls, path: Path, params: Bm25Params | None = None) -> tuple[SparseIndex, int]:
        """The index saved at ``path`` and the revision it reflects; `SnapshotError` if unusable."""

        def read(stream: PayloadReader) -> list[npt.NDArray[Any]]:
            return [np.lib.format.read_array(stream, allow_pickle=False) for _ in range(7)]  # type: ignore[no-untyped-call]

        header, (terms, offsets, post_slots, post_tfs, slot_ids, doc_len, alive) = read_snapshot(path, read)
        text = terms.tobytes().decode()
        vocab = text.split("\n") if text else []
        if len(offsets) != len(vocab) + 1 or not len(slot_ids) == len(doc_len) == len(alive):
            raise SnapshotError(f"{path} is inconsistent")
        sparse = cls(params)
        sparse._vocab = {term: term_id for term_id, term in enumerate(vocab)}
        bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
        sparse._post_slots = [array("q", post_slots[start:end].tobytes()) for start, end in bounds]
        sparse._post_tfs = [array("i", post_tfs[start:end].tobytes()) for start, end in bounds]
        sparse._slot_ids = slot_ids.astype(np.int64)
        sparse._doc_len = doc_len.astype(np.float32)
        sparse._alive = alive.astype(bool)
        sparse._slots = len(slot_ids)
        sparse._live = int(sparse._alive.sum())
        sparse._total_len = float(doc_len[sparse._alive].sum())
        return sparse, snapshot_revision(path, header)
