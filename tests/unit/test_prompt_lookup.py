"""Draft tokens by prompt lookup: what followed the latest earlier occurrence of the sequence's last 3 tokens."""

from __future__ import annotations

import re

from tritonrag.export.runtime.prompt_lookup import NGRAM, draft_tokens


def test_the_draft_is_what_followed_the_latest_earlier_occurrence_of_the_tail() -> None:
    #            0  1  2  3  4  5  6  7  8  9 10 11 12 13 14
    sequence = [9, 1, 2, 3, 4, 5, 8, 1, 2, 3, 6, 7, 0, 1, 2, 3]
    assert NGRAM == 3
    # The tail 1 2 3 occurred at 1 and at 7: the latest, at 7, was followed by 6 7 0 1 ...
    assert draft_tokens(sequence, 4) == [6, 7, 0, 1]
    assert draft_tokens(sequence, 1) == [6]
    # At most what there is: the draft may run up to the last token, never past it.
    assert draft_tokens(sequence, 100) == [6, 7, 0, 1, 2, 3]


def test_no_draft_without_an_earlier_occurrence_or_room() -> None:
    assert draft_tokens([1, 2, 3, 4, 5, 6], 4) == []
    assert draft_tokens([5, 5, 5], 4) == []  # the tail itself is no earlier occurrence
    assert draft_tokens([5, 5, 5, 5], 4) == [5]  # 5 5 5 at 0, followed by one 5
    assert draft_tokens([1, 2, 3, 1, 2, 3], 0) == []
    assert draft_tokens([1, 2, 1, 2], 4) == []  # two tokens repeat, three do not
    assert draft_tokens([], 4) == []


def test_a_repeated_line_of_a_real_answer_is_drafted_whole() -> None:
    # Word ids of an answer that repeats a call from its passage, as grounded answers do.
    words = re.findall(r"\S+", "use json.dumps ( obj , indent = 2 ) ; the call json.dumps ( obj , indent = 2 )")
    ids = {word: index for index, word in enumerate(dict.fromkeys(words))}
    sequence = [ids[w] for w in words]
    cut = words.index("call") + 4  # the answer so far ends with "json.dumps ( obj" the second time
    following = re.findall(r"\S+", ", indent = 2 ) ; the call")
    assert draft_tokens(sequence[:cut], 8) == [ids[w] for w in following]
