"""Test helpers for the generation engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonrag.export.runtime.engine import FinishReason


@dataclass
class Collected:
    """What the engine emitted for one request; setting ``cancelled`` cancels it."""

    deltas: list[str] = field(default_factory=list)
    reason: FinishReason | None = None
    counts: tuple[int, int] = (0, 0)  # prompt tokens, completion tokens
    cancelled: bool = False

    def emit(self, text: str, reason: FinishReason | None, prompt_tokens: int, completion_tokens: int) -> None:
        assert self.reason is None, "nothing may follow the final response"
        self.deltas.append(text)
        self.reason, self.counts = reason, (prompt_tokens, completion_tokens)

    @property
    def text(self) -> str:
        return "".join(self.deltas)
