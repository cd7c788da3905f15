"""Chunker: token windows with exact character offsets, on a WordPiece and a byte-level BPE tokenizer."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tritonrag.clients.wire.schema import NO_HEADER, ChunkHeader, DocumentIn
from tritonrag.server.ingest.chunking import Chunker
from tritonrag.server.store.documents import ChunkSpan, with_header

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Triton serves the embedder and the reranker on one GPU!",
    "Unbelievably, tokenization splits rare words into several pieces?",
    "Naïve café owners serve crème brûlée — délicieux.",
    "東京は日本の首都です。",
    "Emoji like 🚀🔥 and numbers like 3.14159 or 2,718 also count.",
]


@pytest.fixture(scope="module")
def wordpiece(minilm_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 3, trainer)
    return tokenizer


def document(seed: int, sentences: int = 60) -> str:
    rng = random.Random(seed)
    parts = []
    for _ in range(sentences):
        parts.append(rng.choice(SENTENCES))
        parts.append(rng.choice([" ", " ", "  ", "\n", "\n\n", "\t"]))
    return "".join(parts)


def token_offsets(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return [(s, e) for s, e in copy.encode(text, add_special_tokens=False).offsets if e > s]


def tokens_in(offsets: list[tuple[int, int]], span: ChunkSpan) -> int:
    return sum(1 for s, e in offsets if span.start <= s and e <= span.end)


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "byte_bpe"])
@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(16, 0), (32, 8), (64, 16), (200, 40)])
@pytest.mark.parametrize("seed", range(3))
def test_spans_are_exact_bounded_and_cover_every_token(
    request: pytest.FixtureRequest, tokenizer_name: str, chunk_tokens: int, overlap_tokens: int, seed: int
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(tokenizer_name)
    text = document(seed)
    spans = Chunker(tokenizer, chunk_tokens, overlap_tokens).chunk(text)
    offsets = token_offsets(tokenizer, text)
    assert len(offsets) > 200
    for span in spans:
        assert text[span.start : span.end] == span.text
        if tokenizer_name == "wordpiece":  # byte-level tokens carry their leading space
            assert span.text == span.text.strip()
        # a window may hold a few more tokens than it counted only where byte-level tokens share a character
        assert tokens_in(offsets, span) <= chunk_tokens + (4 if tokenizer_name == "byte_bpe" else 0)
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    for start, end in offsets:
        assert any(s.start <= start and end <= s.end for s in spans), text[start:end]
    for previous, span in itertools.pairwise(spans):
        assert span.start > previous.start
        if overlap_tokens == 0:
            assert span.start >= previous.end
        else:
            assert span.start < previous.end


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "byte_bpe"])
def test_windows_end_at_sentence_ends_when_they_can(request: pytest.FixtureRequest, tokenizer_name: str) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(tokenizer_name)
    text = document(11, sentences=120)
    spans = Chunker(tokenizer, 64, 8).chunk(text)
    assert len(spans) > 5
    ends = [s.text.rstrip()[-1] for s in spans[:-1]]
    assert sum(e in ".!?。" for e in ends) >= len(ends) - 1


def test_windows_do_not_start_or_end_inside_a_word(wordpiece: Tokenizer) -> None:
    text = " ".join(["antidisestablishmentarianism", "incomprehensibilities"] * 80)
    spans = Chunker(wordpiece, 20, 5).chunk(text)
    for span in spans:
        assert span.start == 0 or text[span.start - 1] == " "
        assert span.end == len(text) or text[span.end] == " "


def test_a_word_longer_than_the_window_is_still_cut(wordpiece: Tokenizer) -> None:
    text = "x" + "ab" * 45  # one word of 46 tokens (WordPiece gives up on words over 100 characters)
    spans = Chunker(wordpiece, 16, 4).chunk(text)
    assert len(spans) > 1
    assert spans[0].start == 0 and spans[-1].end == len(text)


def test_short_text_is_one_chunk_and_blank_text_none(wordpiece: Tokenizer) -> None:
    chunker = Chunker(wordpiece, 200, 40)
    text = "  \n Paris is the capital of France.  \n"
    assert chunker.chunk(text) == [ChunkSpan("Paris is the capital of France.", 4, 35)]
    assert chunker.chunk("") == []
    assert chunker.chunk(" \n\t ") == []


def test_the_callers_tokenizer_keeps_its_settings(wordpiece: Tokenizer) -> None:
    truncation = wordpiece.truncation
    Chunker(wordpiece, 32, 8).chunk(document(1))
    assert wordpiece.truncation == truncation


def test_from_version_dir(minilm_dir: Path) -> None:
    chunker = Chunker.from_version_dir(minilm_dir, 32, 8)
    assert chunker.chunk("Hello world.") == [ChunkSpan("Hello world.", 0, 12)]


@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(0, 0), (16, 16), (16, -1)])
def test_bad_window_sizes(wordpiece: Tokenizer, chunk_tokens: int, overlap_tokens: int) -> None:
    with pytest.raises(ValueError, match="tokens"):
        Chunker(wordpiece, chunk_tokens, overlap_tokens)


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "byte_bpe"])
def test_text_without_word_boundaries_advances_by_window_minus_overlap(
    request: pytest.FixtureRequest, tokenizer_name: str
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(tokenizer_name)
    text = "東京は日本の首都です" * 300
    tokens = len(token_offsets(tokenizer, text))
    spans = Chunker(tokenizer, 64, 16).chunk(text)
    assert len(spans) <= tokens // (64 - 16) + 2
    assert spans[0].start == 0 and spans[-1].end == len(text)


def test_the_header_is_the_metadata_field_else_the_first_line_cut_to_its_token_budget(wordpiece: Tokenizer) -> None:
    chunker = Chunker(wordpiece, 64, 8)
    text = "\n  \n  Module   json:\tencoder and decoder  \nBody text follows here."
    assert chunker.header(ChunkHeader(), text, {"title": "  The  JSON\nmodule "}) == "The JSON module"
    assert chunker.header(ChunkHeader(), text, {"title": 3}) == "Module json: encoder and decoder"  # not text
    assert (
        chunker.header(ChunkHeader(metadata_field="name"), text, {"title": "x"}) == "Module json: encoder and decoder"
    )
    assert chunker.header(ChunkHeader(first_line=False), text, {}) == ""
    assert chunker.header(NO_HEADER, text, {"title": "x"}) == ""
    assert chunker.header(ChunkHeader(max_tokens=4), text, {}) == "Module json:"  # module, j, ##son, :
    # at most a quarter of the window, and it leaves a window longer than the overlap
    assert len(token_offsets(wordpiece, Chunker(wordpiece, 40, 4).header(ChunkHeader(), SENTENCES[0] * 3, {}))) == 10
    assert len(token_offsets(wordpiece, Chunker(wordpiece, 40, 32).header(ChunkHeader(), SENTENCES[0] * 3, {}))) == 6


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "byte_bpe"])
def test_chunks_leave_room_for_their_header_and_keep_the_original_text(
    request: pytest.FixtureRequest, tokenizer_name: str
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(tokenizer_name)
    text = document(5, sentences=80)
    chunker = Chunker(tokenizer, 96, 8)
    header, spans = chunker.chunk_document(
        DocumentIn(id="d", text=text, metadata={"title": "Quick brown foxes"}), ChunkHeader()
    )
    assert header == "Quick brown foxes"
    offsets = token_offsets(tokenizer, text)
    room = 96 - len(token_offsets(tokenizer, header)) - 1
    assert all(text[s.start : s.end] == s.text for s in spans)
    assert max(tokens_in(offsets, s) for s in spans) <= room + (4 if tokenizer_name == "byte_bpe" else 0)
    assert len(spans) > len(chunker.chunk(text))  # smaller windows: more of them
    assert all(len(token_offsets(tokenizer, with_header(header, s.text))) <= 96 + 4 for s in spans)
