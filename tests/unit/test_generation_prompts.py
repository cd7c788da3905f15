"""The grounded prompt, citation parsing and the extractive fallback answer."""

from __future__ import annotations

import pytest

from tritonrag.clients.wire.schema import ChatMessage
from tritonrag.server.generation.extractive import extractive_answer
from tritonrag.server.generation.prompts import (
    SYSTEM_PROMPT,
    cited_numbers,
    grounded_chat,
    grounded_content,
    grounded_messages,
)


def test_grounded_messages_number_the_passages_before_the_question() -> None:
    messages = grounded_messages("Where is Paris?", ["Paris is in France.", "Lyon is in France too."])
    assert [m.role for m in messages] == ["system", "user"]
    assert messages[0].content == SYSTEM_PROMPT
    assert "[1]" in SYSTEM_PROMPT and "only" in SYSTEM_PROMPT
    assert messages[1].content == (
        "Passages:\n[1] Paris is in France.\n[2] Lyon is in France too.\n\nQuestion: Where is Paris?"
    )


def test_without_passages_the_prompt_says_so() -> None:
    assert grounded_content("Why?", []) == "Passages: none.\n\nQuestion: Why?"


def test_grounded_chat_keeps_the_callers_system_text_and_grounds_the_last_user_message() -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="What is tea?"),
        ChatMessage(role="assistant", content="Tea is"),
    ]
    grounded = grounded_chat(messages, ["Tea is a drink."])
    assert grounded[0] == ChatMessage(role="system", content=f"{SYSTEM_PROMPT}\n\nBe brief.")
    assert grounded[1:3] == messages[1:3]
    assert grounded[3] == ChatMessage(role="user", content="Passages:\n[1] Tea is a drink.\n\nQuestion: What is tea?")
    assert grounded[4] == messages[4]


def test_grounded_chat_adds_the_instruction_when_there_is_no_system_message() -> None:
    grounded = grounded_chat([ChatMessage(role="user", content="Q")], [])
    assert grounded == [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        ChatMessage(role="user", content="Passages: none.\n\nQuestion: Q"),
    ]


@pytest.mark.parametrize(
    ("answer", "sources", "cited"),
    [
        ("Paris is in France [1].", 2, [1]),
        ("Both [2][1], and again [ 2 ].", 2, [1, 2]),
        ("Lists count: [1, 3] and [2; 4].", 4, [1, 2, 3, 4]),
        ("Out of range [0], [5] and [12] are ignored [3].", 4, [3]),
        ("Not citations: [a], [1a], (1), 1.", 4, []),
        ("Anything [1]", 0, []),
    ],
)
def test_cited_numbers(answer: str, sources: int, cited: list[int]) -> None:
    assert cited_numbers(answer, sources) == cited


def test_extractive_answer_is_the_first_sentences_cited() -> None:
    passage = "Paris is the capital of France.  It is on the Seine!\nIt has many museums? Yes."
    assert extractive_answer(passage) == "Paris is the capital of France. It is on the Seine! [1]"
    assert extractive_answer(passage, citation=3, sentences=1) == "Paris is the capital of France. [3]"
    assert extractive_answer("no full stop\nhere") == "no full stop here [1]"
