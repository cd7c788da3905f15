"""The generator's text building blocks on SmolLM2's real tokenizer, which only transformers reads (from GGUF)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from tests import tiny_models
from tritonrag.export.runtime.chat import ChatTemplate
from tritonrag.export.runtime.encoding import InputError
from tritonrag.export.runtime.text_stream import TextStream


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    backend: Tokenizer = tiny_models._tokenizer(tiny_models.SMOLLM2).backend_tokenizer
    return backend


def test_text_stream_cuts_stop_strings_and_never_leaks_them(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("The answer is Paris. END of story").ids
    stream = TextStream(smollm2_tokenizer, stop=["END"])
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(pieces) == "The answer is Paris. "
    assert all("E" not in piece for piece in pieces)


def test_text_stream_holds_back_a_split_character(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("café 😀!").ids
    stream = TextStream(smollm2_tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) + stream.flush() == "café 😀!"
    assert all("\ufffd" not in piece for piece in pieces)


def test_chat_template_renders_as_transformers_does() -> None:
    tokenizer = tiny_models._tokenizer(tiny_models.SMOLLM2)
    assert isinstance(tokenizer.chat_template, str)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.render(messages) == expected
    with pytest.raises(InputError, match="messages\\[0\\]: role must be one of"):
        chat.render([{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="messages is empty"):
        chat.render([])
