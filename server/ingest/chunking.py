"""Cutting documents into windows of the embedder's own tokens, with character offsets.

Windows count the tokens the embedder sees (special tokens aside), so a chunk never exceeds what
the model reads. Each window ends, when it can, at a sentence or paragraph end, else between two
words, in the second half of the window; the next window starts about ``overlap_tokens`` earlier, at
the start of a word when one is near. ``text[span.start:span.end] == span.text`` always holds, and every
character that belongs to a token lies in some span.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer

from tritonrag.clients.wire.schema import ChunkHeader, DocumentIn, Metadata
from tritonrag.export.runtime.contract import TOKENIZER_FILE
from tritonrag.server.store.documents import ChunkSpan  # what the store keeps of a chunk

_SENTENCE_ENDS = frozenset(".!?;:\u3002\uff01\uff1f")  # with the ideographic full stop, ! and ?

# How good a cut between two tokens is: the higher, the better. Byte-level tokens may share a character.
_INSIDE_CHARACTER, _INSIDE_WORD, _BETWEEN_WORDS, _SENTENCE_END = -1, 0, 1, 2


class DocumentChunks(NamedTuple):
    """A document's chunk header ("" when none) and its chunks."""

    header: str
    spans: list[ChunkSpan]


class Chunker:
    """Token windows of ``chunk_tokens`` tokens, consecutive windows sharing about ``overlap_tokens``."""

    def __init__(self, tokenizer: Tokenizer, chunk_tokens: int, overlap_tokens: int) -> None:
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError("overlap_tokens must be at least 0 and smaller than chunk_tokens")
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        # A private copy: truncation and padding would cut or pad what we count, and the caller's
        # tokenizer keeps its settings.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @classmethod
    def from_version_dir(cls, version_dir: Path, chunk_tokens: int, overlap_tokens: int) -> Chunker:
        """A chunker with the tokenizer of an exported model version."""
        return cls(Tokenizer.from_file(str(version_dir / TOKENIZER_FILE)), chunk_tokens, overlap_tokens)

    def chunk_document(self, document: DocumentIn, header: ChunkHeader) -> DocumentChunks:
        """A document's header under ``header`` and its chunks, each with room for the header."""
        line = self.header(header, document.text, document.metadata)
        return DocumentChunks(line, self.chunk(document.text, line))

    def header(self, spec: ChunkHeader, text: str, metadata: Metadata) -> str:
        """A document's chunk header under ``spec`` (see `ChunkHeader`): one line, cut at ``spec.max_tokens``
        tokens, a quarter of ``chunk_tokens``, and what leaves a window longer than the overlap; "" when there
        is none."""
        value = metadata.get(spec.metadata_field) if spec.metadata_field else None
        if not isinstance(value, str) or not value.strip():
            value = next((line for line in text.splitlines() if line.strip()), "") if spec.first_line else ""
        line = " ".join(value.split())
        # At most a quarter of the window, and never so much that the window is no longer than the overlap.
        budget = min(spec.max_tokens, self.chunk_tokens // 4, self.chunk_tokens - self.overlap_tokens - 2)
        if budget < 1:
            return ""
        offsets = self._offsets(line)
        return line if len(offsets) <= budget else line[: offsets[budget - 1][1]]

    def chunk(self, text: str, header: str = "") -> list[ChunkSpan]:
        """The chunks of ``text`` in order (none when it has no tokens), each with room for ``header`` and a line
        break before it."""
        offsets = self._offsets(text)
        window = self.chunk_tokens - (len(self._offsets(header)) + 1 if header else 0)
        spans: list[ChunkSpan] = []
        first = 0
        while first < len(offsets):
            stop = min(first + window, len(offsets))
            if stop < len(offsets):
                stop = self._best_cut(text, offsets, first, stop, window)
            start = min(s for s, _ in offsets[first:stop])
            end = max(e for _, e in offsets[first:stop])
            spans.append(ChunkSpan(text[start:end], start, end))
            if stop == len(offsets):
                break
            first = self._next_start(text, offsets, first, stop)
        return spans

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        """The character span of each token of ``text`` that covers any."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return [(start, end) for start, end in encoding.offsets if end > start]

    def _best_cut(self, text: str, offsets: list[tuple[int, int]], first: int, stop: int, window: int) -> int:
        """The latest best cut in the second half of the window ``[first, stop)`` (and past the overlap)."""
        earliest = first + max(self.overlap_tokens + 1, window // 2)
        best, best_quality = stop, _cut_quality(text, offsets, stop)
        for cut in range(stop - 1, earliest - 1, -1):
            if best_quality == _SENTENCE_END:
                break
            quality = _cut_quality(text, offsets, cut)
            if quality > best_quality:
                best, best_quality = cut, quality
        return best

    def _next_start(self, text: str, offsets: list[tuple[int, int]], first: int, stop: int) -> int:
        """Where the window after ``[first, stop)`` starts: ``overlap_tokens`` back, moved to the nearest
        word start within half the overlap either way."""
        target = stop - self.overlap_tokens  # > first: a window ends past its overlap
        for distance in range(self.overlap_tokens // 2 + 1):
            for candidate in (target - distance, target + distance):
                if first < candidate <= stop and _cut_quality(text, offsets, candidate) > _INSIDE_WORD:
                    return candidate
        return target


def _cut_quality(text: str, offsets: list[tuple[int, int]], cut: int) -> int:
    """How good a cut before token ``cut`` (0 < cut < len(offsets)) is."""
    previous_end, next_start = offsets[cut - 1][1], offsets[cut][0]
    if next_start < previous_end:
        return _INSIDE_CHARACTER
    before, after = text[previous_end - 1], text[next_start]
    # Whitespace between the tokens, or leading the next one (byte-level tokens carry their space).
    gap = text[previous_end:next_start] + (after if after.isspace() else "")
    if "\n" in gap or (gap and before in _SENTENCE_ENDS):
        return _SENTENCE_END
    if gap or not (before.isalnum() and after.isalnum()):
        return _BETWEEN_WORDS
    return _INSIDE_WORD
