"""LexicalIndex: BM25 ranking of real sentences with stemming and stop words per language, filters before the
top-k cut, removal, durability across reopening, and a damaged directory replaced by an empty index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tritonrag.clients.wire.schema import Language
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.retrieval.lexical import LexicalIndex

SENTENCES = [
    "The cat sat on the mat and purred while the rain fell outside.",
    "Dogs are loyal companions and love long walks in the park.",
    "A healthy cat food contains protein, taurine and very little grain.",
    "The central bank raised interest rates to slow down inflation.",
    "Inflation erodes the purchasing power of savings over time.",
    "Python's garbage collector frees objects that are no longer referenced.",
    "The cat chased the dog around the garden until both were tired.",
]
IDS = np.arange(10, 10 + len(SENTENCES), dtype=np.int64)
NONE = np.empty(0, np.int64)


def index_of(directory: Path, sentences: list[str] = SENTENCES, language: Language = Language.english) -> LexicalIndex:
    index = LexicalIndex(directory, language)
    index.write(NONE, IDS[: len(sentences)], sentences)
    index.refresh()
    return index


def ranked(index: LexicalIndex, query: str, k: int = 3, allowed: list[int] | None = None) -> list[int]:
    only = None if allowed is None else np.array([10 + i for i in allowed], np.int64)
    return [int(i) - 10 for i in index.search(query, k, only)[1]]


def test_ranking_of_real_sentences(tmp_path: Path) -> None:
    index = index_of(tmp_path)
    assert ranked(index, "cat food")[0] == 2  # both terms
    assert ranked(index, "interest rates inflation")[:2] == [3, 4]
    assert ranked(index, "garbage collector")[:1] == [5]
    assert set(ranked(index, "cat", k=10)) == {0, 2, 6}
    assert ranked(index, "unknown words") == []


def test_english_stems_and_drops_stop_words(tmp_path: Path) -> None:
    index = index_of(tmp_path)
    assert ranked(index, "chasing dogs", k=2) == [6, 1]  # chased / dog, dogs: one stem each
    assert ranked(index, "walking companion", k=1) == [1]
    assert ranked(index, "the and of") == []  # stop words alone match nothing
    scores, _ = index.search("the cat", 3)
    np.testing.assert_allclose(scores, index.search("cat", 3)[0])  # "the" adds nothing


def test_a_text_holding_the_query_word_for_word_ranks_first(tmp_path: Path) -> None:
    # Twelve terms in each text, the query's eight among them: only their order tells the texts apart.
    pasted = "maximum recursion depth exceeded while calling a Python object"
    texts = [
        "Python object calling while exceeded depth recursion maximum, as a log line of the worker said.",
        "RecursionError: maximum recursion depth exceeded while calling a Python object, said the worker log.",
        "Exceeded while calling maximum depth: the Python object recursion, a log line of the worker said.",
    ]
    index = index_of(tmp_path, texts)
    scores, ids = index.search(pasted, 3)
    assert ids[0] == 11 and scores[0] > 1.5 * scores[1]
    np.testing.assert_allclose(scores[1], scores[2], rtol=1e-5)  # the other two: words alone, equal
    # Stop words inside the phrase are gaps (stemmed and dropped as in the texts), and two words make a phrase.
    assert ranked(index, "the Python object recursion", k=1) == [2]
    assert ranked(index, "recursion maximum", k=1) == [0]


def test_a_query_of_three_words_or_more_in_order_is_held_verbatim(tmp_path: Path) -> None:
    index = index_of(tmp_path)
    assert index.holds_phrase("garbage collector frees objects")
    assert index.holds_phrase("Rates TO slow down!")  # case, punctuation; a stop word is a gap where it was
    assert index.holds_phrase("raising interest rate")  # stemmed as the texts are
    assert not index.holds_phrase("frees garbage collector objects")  # the words, out of order
    assert not index.holds_phrase("rates slow down")  # the stop word's place is kept
    assert not index.holds_phrase("interest rates")  # two words: common by chance, not taken as copied
    assert not index.holds_phrase("the and of on")  # stop words alone
    assert not index.holds_phrase("")
    python, bank = np.array([15], np.int64), np.array([13], np.int64)
    assert index.holds_phrase("garbage collector frees", python)
    assert not index.holds_phrase("garbage collector frees", bank)  # only the allowed texts count
    assert not index.holds_phrase("garbage collector frees", NONE)


def test_language_none_keeps_words_as_they_are(tmp_path: Path) -> None:
    index = index_of(tmp_path, language=Language.none)
    assert ranked(index, "chasing") == []
    assert ranked(index, "chased") == [6]
    assert set(ranked(index, "the", k=10)) == {0, 1, 3, 4, 6}  # no stop words


def test_query_syntax_is_text(tmp_path: Path) -> None:
    index = index_of(tmp_path)
    for query in ('text:cat AND "dog', "cat -dog +(inflation)", "cat*", "a:b:c ^2 ~", ""):
        index.search(query, 3)  # never a parse error
    assert ranked(index, "CAT OR NOT dog", k=10)[:3] == ranked(index, "cat dog", k=10)[:3]


def test_filter_masks_candidates_before_the_cut(tmp_path: Path) -> None:
    index = index_of(tmp_path)
    assert ranked(index, "cat", 1, allowed=[6, 3]) == [6]
    assert ranked(index, "cat", 5, allowed=[3]) == []
    assert ranked(index, "cat", 5, allowed=[]) == []
    scores, _ = index.search("cat", 1, np.array([16], np.int64))
    np.testing.assert_allclose(scores, [s for s, i in zip(*index.search("cat", 3), strict=True) if i == 16])


def test_remove_add_and_ids(tmp_path: Path) -> None:
    index = LexicalIndex(tmp_path, Language.english)
    ids = np.arange(3000, dtype=np.int64)
    index.write(NONE, ids, [f"common word{i}" for i in range(3000)])
    index.refresh()
    index.write(ids[:2000], NONE, [])
    assert len(index) == 3000  # searches see the last refresh
    index.refresh()
    assert len(index) == 1000 and index.ids().tolist() == list(range(2000, 3000))
    assert index.search("word5", 5)[1].tolist() == []
    assert index.search("word2500", 5)[1].tolist() == [2500]
    assert len(index.search("common", 2000)[1]) == 1000
    index.write(np.array([7, 2500], np.int64), np.array([5000], np.int64), ["word5 again"])  # 7: absent
    index.refresh()
    assert index.search("word5", 5)[1].tolist() == [5000] and index.search("word2500", 5)[1].tolist() == []
    with pytest.raises(InvalidArgumentError):
        index.search("common", 0)


def test_writes_survive_reopening_and_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    index = index_of(tmp_path)
    index.write(IDS[[1]], NONE, [])  # durable, though never refreshed
    with pytest.raises(ValueError):  # one text short: nothing of it is written
        index.write(IDS[[2]], np.array([99, 100], np.int64), ["a cat that never lands"])
    reopened = LexicalIndex(tmp_path, Language.english)
    assert reopened.ids().tolist() == [i for i in IDS.tolist() if i != 11]
    assert ranked(reopened, "chasing dogs", k=2) == [6]


def test_a_damaged_directory_becomes_an_empty_index(tmp_path: Path) -> None:
    index_of(tmp_path)
    (tmp_path / "meta.json").write_text("{ not json")
    index = LexicalIndex.open_or_empty(tmp_path, Language.english)
    assert len(index) == 0 and index.ids().tolist() == []


def test_two_processes_may_write_one_directory_in_turn(tmp_path: Path) -> None:
    first, second = LexicalIndex(tmp_path, Language.english), LexicalIndex(tmp_path, Language.english)
    first.write(NONE, IDS[:2], SENTENCES[:2])
    second.write(NONE, IDS[2:4], SENTENCES[2:4])  # the writer lock is free between writes
    first.refresh()
    assert first.ids().tolist() == IDS[:4].tolist()
