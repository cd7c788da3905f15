"""Tokenisation as the served models and the parity check see it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tritonrag.export.runtime.encoding import InputError, ModelMetadata, ModelTokenizer, PromptTemplate


def _tokenizer(minilm_dir: Path, max_length: int = 16, prompt: PromptTemplate | None = None) -> ModelTokenizer:
    metadata = ModelMetadata(
        task="reranker" if prompt else "embedder",
        head="generative_query_likelihood" if prompt else "mean_pool",
        max_sequence_length=max_length,
        inputs=("input_ids", "attention_mask", "token_type_ids"),
        pad_token_id=0,
        prompt=prompt,
    )
    return ModelTokenizer(Tokenizer.from_file(str(minilm_dir / "tokenizer.json")), metadata)


def test_text_gets_special_tokens(minilm_dir: Path) -> None:
    tok = _tokenizer(minilm_dir)
    ids = tok.encode_text("hello world").ids
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    assert len(ids) == 4


def test_long_text_is_truncated_or_rejected(minilm_dir: Path) -> None:
    tok = _tokenizer(minilm_dir, max_length=8)
    text = "one two three four five six seven eight nine ten eleven"
    cut = tok.encode_text(text, truncate=True).ids
    assert len(cut) == 8 and cut[-1] == 102
    with pytest.raises(InputError, match="13 tokens, over the model's limit of 8"):
        tok.encode_text(text, truncate=False)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_rejected(minilm_dir: Path, text: str) -> None:
    with pytest.raises(InputError, match="text is empty"):
        _tokenizer(minilm_dir).encode_text(text)


def test_pair_truncates_only_the_passage(minilm_dir: Path) -> None:
    tok = _tokenizer(minilm_dir, max_length=10)
    enc = tok.encode_pair("capital of france", "paris is the capital and the largest city of france by far")
    assert len(enc.ids) == 10
    # [CLS] capital of france [SEP] passage... [SEP]: the query survives whole, segment ids mark the passage.
    assert enc.ids[:5] == [101, 3007, 1997, 2605, 102]
    assert enc.type_ids == [0] * 5 + [1] * 5


def test_prompt_marks_the_query_tokens_and_cuts_the_passage_first(minilm_dir: Path) -> None:
    prompt = PromptTemplate("passage : {passage} query : {query}")
    tok = _tokenizer(minilm_dir, max_length=12, prompt=prompt)
    short = tok.encode_pair("capital city", "france")
    assert tok._tokenizer.decode(short.ids) == "passage : france query : capital city"
    assert short.type_ids == [0] * 5 + [1] * 2  # the query's two tokens are the ones scored
    long = tok.encode_pair("capital city", "one two three four five six seven eight")
    assert len(long.ids) == 12 and long.type_ids == [0] * 10 + [1] * 2
    assert tok._tokenizer.decode(long.ids) == "passage : one two three four five six query : capital city"
    with pytest.raises(InputError, match="over the model's limit of 12"):
        tok.encode_pair("capital city", "one two three four five six seven eight", truncate=False)


def test_a_long_query_is_cut_only_past_half_the_room(minilm_dir: Path) -> None:
    tok = _tokenizer(minilm_dir, max_length=12, prompt=PromptTemplate("passage : {passage} query : {query}"))
    # 8 tokens of room: the passage keeps half, the query the rest, cut at its end.
    encoding = tok.encode_pair("one two three four five six seven", "alpha beta gamma delta epsilon")
    assert len(encoding.ids) == 12 and encoding.type_ids == [0] * 8 + [1] * 4
    assert tok._tokenizer.decode(encoding.ids) == "passage : alpha beta gamma delta query : one two three four"
    # A short passage leaves its unused room to the query.
    encoding = tok.encode_pair("one two three four five six seven", "alpha")
    assert encoding.type_ids == [0] * 5 + [1] * 7


def test_prompt_must_end_at_the_query(minilm_dir: Path) -> None:
    tok = _tokenizer(minilm_dir, prompt=PromptTemplate("passage : {passage} query : {query} end"))
    with pytest.raises(ValueError, match="must end at the query slot"):
        tok.encode_pair("capital", "france")


def test_pad_right_pads_to_the_longest_row(minilm_dir: Path) -> None:
    tok = _tokenizer(minilm_dir)
    arrays = tok.pad([tok.encode_text("hello"), tok.encode_text("hello big world")])
    assert list(arrays) == ["input_ids", "attention_mask", "token_type_ids"]
    assert arrays["input_ids"].dtype == np.int64
    assert arrays["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert arrays["input_ids"][0, 3:].tolist() == [0, 0]
