"""Generated tokens → text deltas, holding back what may still change: a split UTF-8 character, or the
start of a stop string (which must never reach the client)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

INCOMPLETE = "\ufffd"  # what decoding yields for a byte sequence cut inside a character


class TextStream:
    """The text of one sequence's generated tokens, released in safe pieces."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; the newly safe text. Sets ``stopped`` when a stop string appeared (it is cut off)."""
        self._ids.append(token_id)
        text: str = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith(INCOMPLETE):
            return ""
        self._text = text
        longest = max((len(s) for s in self._stop), default=0)
        search_from = max(0, self._sent - longest)
        found = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
        if found:
            self._text = text[: min(found)]
            self.stopped = True
            return self.flush()
        safe = len(text) - self._held_back(text)
        delta = text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return delta

    def flush(self) -> str:
        """Whatever has not been released yet (at the end of the generation)."""
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta

    @property
    def text(self) -> str:
        """All text so far, without a stop string."""
        return self._text

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        for size in range(min(len(text), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
