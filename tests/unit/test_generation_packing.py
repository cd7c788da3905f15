"""Packing passages into the generator's context window, with a tokenizer of one token per word."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from tritonrag.clients.wire.schema import ChatMessage
from tritonrag.export.runtime.chat import ChatTemplate
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.generation.packing import ContextWindow, pack
from tritonrag.server.generation.prompts import grounded_messages

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BUILD = partial(grounded_messages, "which words")


def word_tokenizer() -> Tokenizer:
    """Every whitespace-separated word is one token."""
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()  # type: ignore[assignment]
    return tokenizer


def window(context_tokens: int) -> ContextWindow:
    return ContextWindow(word_tokenizer(), context_tokens, ChatTemplate(CHATML))


def frame_tokens() -> int:
    """Tokens of the prompt without passages."""
    probe = window(10_000)
    return probe.count(probe.render(BUILD([])))


def words(count: int, word: str = "w") -> str:
    return " ".join([word] * count)


def test_passages_in_rank_order_skip_one_that_does_not_fit() -> None:
    # Line costs: "[n] " plus one token per word: 6, 21 and 3 (as "[2]").
    passages = [words(5, "a"), words(20, "b"), words(2, "c")]
    packed = pack(window(frame_tokens() + 10 + 6 + 3), BUILD, passages, max_tokens=10, default_max_tokens=256)
    assert packed.kept == [0, 2] and packed.dropped == 1 and packed.max_tokens == 10
    assert packed.messages == BUILD([passages[0], passages[2]])
    assert "[1] a a a a a\n[2] c c\n" in packed.messages[1].content
    assert packed.prompt_tokens + packed.max_tokens <= frame_tokens() + 19


def test_everything_fits_in_a_large_window() -> None:
    passages = [words(3, "a"), words(4, "b"), words(5, "c")]
    packed = pack(window(4096), BUILD, passages, max_tokens=None, default_max_tokens=256)
    assert packed.kept == [0, 1, 2] and packed.dropped == 0 and packed.max_tokens == 256
    big = window(4096)
    assert packed.prompt_tokens == big.count(big.render(BUILD(passages)))


def test_the_rendered_prompt_is_verified_and_the_last_passage_dropped_while_over() -> None:
    def doubled(texts: Sequence[str]) -> list[ChatMessage]:  # renders each passage twice: the estimate is short
        return BUILD([f"{t} {t}" for t in texts])

    # Estimated 4 + 4 tokens; rendered, both take 7 + 7 (one less than the frame's "none.").
    passages = [words(3, "a"), words(3, "b")]
    frame = window(10_000).count(window(10_000).render(doubled([])))
    packed = pack(window(frame + 8 + 8), doubled, passages, max_tokens=8, default_max_tokens=256)
    assert packed.kept == [0] and packed.dropped == 1
    assert packed.prompt_tokens == frame - 1 + 7


def test_max_tokens_none_takes_the_default_capped_by_the_window() -> None:
    passages = [words(3)]
    capped = pack(window(frame_tokens() + 50), BUILD, passages, max_tokens=None, default_max_tokens=256)
    assert capped.max_tokens == 50 and capped.kept == [] and capped.dropped == 1
    assert capped.messages == BUILD([])
    default = pack(window(frame_tokens() + 50), BUILD, passages, max_tokens=None, default_max_tokens=20)
    assert default.max_tokens == 20 and default.kept == [0]


def test_max_tokens_beyond_the_window_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="leaves 50 for the answer") as error:
        pack(window(frame_tokens() + 50), BUILD, [], max_tokens=51, default_max_tokens=256)
    assert error.value.field == "sampling.max_tokens"
    with pytest.raises(InvalidArgumentError, match="leaves 0 for the answer") as error:
        pack(window(frame_tokens() - 3), BUILD, [], max_tokens=None, default_max_tokens=256, field="max_tokens")
    assert error.value.field == "max_tokens"


def test_a_template_that_refuses_the_messages_is_an_invalid_argument() -> None:
    refusing = ContextWindow(word_tokenizer(), 100, ChatTemplate("{{ raise_exception('no system role') }}"))
    with pytest.raises(InvalidArgumentError, match="no system role") as error:
        pack(refusing, BUILD, [], max_tokens=None, default_max_tokens=10)
    assert error.value.field == "messages"


def test_from_version_dir_reads_the_window_and_template(tmp_path: Path) -> None:
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    metadata = {
        "task": "generator",
        "head": "causal_lm",
        "max_sequence_length": 123,
        "inputs": ["input_ids", "attention_mask"],
        "pad_token_id": 0,
        "chat_template": CHATML,
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
    }
    (tmp_path / "tritonrag.json").write_text(json.dumps(metadata))
    loaded = ContextWindow.from_version_dir(tmp_path)
    assert loaded.context_tokens == 123
    assert loaded.template == ChatTemplate(CHATML, "<s>", "<|im_end|>")
    assert loaded.count("one two three") == 3

    (tmp_path / "tritonrag.json").write_text(json.dumps({**metadata, "chat_template": None}))
    plain = ContextWindow.from_version_dir(tmp_path)
    assert plain.template is None
    assert plain.render(BUILD([])) == f"system: {BUILD([])[0].content}\n\nuser: {BUILD([])[1].content}\n\nassistant:"
