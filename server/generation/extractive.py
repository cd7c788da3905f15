"""Answers given without the generator: none found, or the generator is down."""

from __future__ import annotations

import re

NO_PASSAGES_ANSWER = "No passages in the collection match the question, so there is nothing to answer from."
EXTRACT_SENTENCES = 2

_SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+")


def extractive_answer(passage: str, citation: int = 1, sentences: int = EXTRACT_SENTENCES) -> str:
    """The first ``sentences`` sentences of ``passage`` (the best one), cited as ``[citation]``."""
    head = _SENTENCE_END.split(passage.strip(), maxsplit=sentences)[:sentences]
    return f"{' '.join(' '.join(head).split())} [{citation}]"
