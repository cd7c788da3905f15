"""Retrieved passages into the generator's context window, counted with the generator's own tokenizer.

The passages get what the window leaves: context window - ``max_tokens`` - the tokens of the prompt
without passages. Passages are never split. Policy: they are taken best first; one that does not fit
in what is left is dropped, and the later (smaller) ones are still tried, so the window fills as far
as the ranking allows. The prompt with the chosen passages is then rendered and counted once more
(tokens can merge across a passage's edges); while it is over, the last chosen passage is dropped too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from tritonrag.clients.wire.schema import ChatMessage
from tritonrag.export.runtime.chat import ChatTemplate
from tritonrag.export.runtime.contract import TOKENIZER_FILE
from tritonrag.export.runtime.encoding import InputError, ModelMetadata
from tritonrag.server.errors import InvalidArgumentError

from .prompts import passage_line

PromptBuilder = Callable[[Sequence[str]], list[ChatMessage]]  # passage texts -> the chat prompt holding them


@dataclass(frozen=True)
class ContextWindow:
    """A generator version's context window, and its prompt rendering and token count as the model does them."""

    tokenizer: Tokenizer
    context_tokens: int  # prompt + completion
    template: ChatTemplate | None  # None: the model takes a raw prompt only

    @classmethod
    def from_version_dir(cls, version_dir: Path) -> ContextWindow:
        """The window of an exported generator version (its ``tokenizer.json`` and ``tritonrag.json``)."""
        metadata = ModelMetadata.read(version_dir)
        tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        extra = metadata.extra
        template = extra.get("chat_template")
        chat = ChatTemplate(template, extra.get("bos_token") or "", extra.get("eos_token") or "") if template else None
        return cls(tokenizer, metadata.max_sequence_length, chat)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text of ``messages``: the model's chat template, else "role: content" paragraphs."""
        if self.template is None:
            return "".join(f"{m.role}: {m.content}\n\n" for m in messages) + "assistant:"
        try:
            return self.template.render([m.model_dump() for m in messages], add_generation_prompt=True)
        except InputError as exc:
            raise InvalidArgumentError(str(exc), field="messages") from exc

    def count(self, text: str) -> int:
        """Tokens of ``text`` as the model tokenises a rendered prompt (no special tokens added)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


@dataclass(frozen=True)
class Packed:
    """A prompt with the passages that fit."""

    messages: list[ChatMessage]
    kept: list[int]  # indices of the packed passages, best first; citation n is passage kept[n - 1]
    dropped: int  # passages left out
    prompt_tokens: int
    max_tokens: int  # the completion's budget


def pack(
    window: ContextWindow,
    build: PromptBuilder,
    passages: Sequence[str],
    max_tokens: int | None,
    default_max_tokens: int,
    field: str = "sampling.max_tokens",
) -> Packed:
    """Pack ``passages`` (best first) into the prompt ``build`` makes, leaving ``max_tokens`` for the answer.

    ``max_tokens`` None is ``default_max_tokens`` capped by what the prompt leaves. A ``max_tokens``
    the window cannot hold beside the prompt without passages is an ``InvalidArgumentError`` on ``field``.
    """
    frame = window.count(window.render(build([])))
    room = window.context_tokens - frame
    wanted = min(default_max_tokens, room) if max_tokens is None else max_tokens
    if wanted < 1 or wanted > room:
        raise InvalidArgumentError(
            f"{field} is {max_tokens or default_max_tokens}, but the prompt takes {frame} of the generator's "
            f"{window.context_tokens} context tokens and leaves {max(room, 0)} for the answer",
            field=field,
        )
    budget, used = room - wanted, 0
    kept: list[int] = []
    for index, text in enumerate(passages):
        cost = window.count(passage_line(len(kept) + 1, text) + "\n")
        if used + cost <= budget:
            kept.append(index)
            used += cost
    while True:
        messages = build([passages[i] for i in kept])
        prompt_tokens = window.count(window.render(messages))
        if prompt_tokens + wanted <= window.context_tokens or not kept:
            return Packed(messages, kept, len(passages) - len(kept), prompt_tokens, wanted)
        kept.pop()
