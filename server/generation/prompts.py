"""What the generator is told for a grounded answer, and which passages its answer cites.

The wording is short on purpose: the default generator (SmolLM2-135M-Instruct) is a tiny model that
follows a brief instruction better than a long one. Passages are numbered from 1 in rank order, and
the answer cites them as ``[1]``, ``[2]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tritonrag.clients.wire.schema import ChatMessage

SYSTEM_PROMPT = (
    "Answer the question using only the numbered passages. "
    "Cite each passage you use by its number, like [1] or [2]. "
    "If the passages do not contain the answer, say that you do not know."
)
NO_PASSAGES = "Passages: none."

# "[2]", and lists such as "[1, 3]" or "[1; 3]".
_CITATION = re.compile(r"\[\s*(\d+(?:\s*[,;]\s*\d+)*)\s*\]")


def passage_line(citation: int, text: str) -> str:
    """One passage as the user message lists it."""
    return f"[{citation}] {text}"


def grounded_content(question: str, passages: Sequence[str]) -> str:
    """The user message: the numbered passages, then the question."""
    if not passages:
        return f"{NO_PASSAGES}\n\nQuestion: {question}"
    lines = "\n".join(passage_line(number, text) for number, text in enumerate(passages, start=1))
    return f"Passages:\n{lines}\n\nQuestion: {question}"


def grounded_messages(question: str, passages: Sequence[str]) -> list[ChatMessage]:
    """The chat prompt of a grounded answer: the instruction, then passages and question."""
    return [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        ChatMessage(role="user", content=grounded_content(question, passages)),
    ]


def grounded_chat(messages: Sequence[ChatMessage], passages: Sequence[str]) -> list[ChatMessage]:
    """A conversation grounded on ``passages``: the instruction leads the system message (the caller's own
    system text follows it), and the passages go before the last user message's text."""
    last_user = max(i for i, message in enumerate(messages) if message.role == "user")
    grounded = [
        ChatMessage(role=m.role, content=grounded_content(m.content, passages)) if i == last_user else m
        for i, m in enumerate(messages)
    ]
    if grounded[0].role == "system":
        return [ChatMessage(role="system", content=f"{SYSTEM_PROMPT}\n\n{grounded[0].content}"), *grounded[1:]]
    return [ChatMessage(role="system", content=SYSTEM_PROMPT), *grounded]


def cited_numbers(answer: str, sources: int) -> list[int]:
    """The citation numbers ``answer`` uses, ascending; only those of the ``sources`` passages given (1..sources)."""
    numbers = {int(n) for group in _CITATION.findall(answer) for n in re.split(r"[,;]", group)}
    return sorted(n for n in numbers if 1 <= n <= sources)
