"""Tokenisation shared by the Triton models and the export-time parity check.

One ``ModelTokenizer`` turns texts (embedder) or (query, passage) pairs (reranker) into
token ids exactly as the served model sees them, so the parity check measures what is served. A
query-likelihood reranker's rows put the passage in a prompt and mark the query's tokens (segment id 1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from .contract import METADATA_FILE, TOKENIZER_FILE


class InputError(ValueError):
    """A request input the model cannot take (empty, or too long with truncation off)."""


@dataclass(frozen=True)
class PromptTemplate:
    """A rendered chat prompt with a slot for the passage and, at its end, one for the query."""

    template: str
    query_slot: str = "{query}"
    passage_slot: str = "{passage}"

    def parts(self) -> tuple[str, str]:
        """The literal text before the passage, and between the passage and the query."""
        head, rest = self.template.split(self.passage_slot, 1)
        middle, tail = rest.split(self.query_slot, 1)
        if tail:
            raise ValueError(f"the prompt must end at the query slot; it has {tail!r} after it")
        return head, middle


@dataclass(frozen=True)
class ModelMetadata:
    """What ``tritonrag.json`` says about one exported version."""

    task: str
    head: str
    max_sequence_length: int
    inputs: tuple[str, ...]
    pad_token_id: int
    source: str = ""
    dimension: int | None = None
    prompt: PromptTemplate | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        known = {"task", "head", "max_sequence_length", "inputs", "pad_token_id", "source", "dimension", "prompt"}
        prompt = data.get("prompt")
        return cls(
            task=data["task"],
            head=data["head"],
            max_sequence_length=int(data["max_sequence_length"]),
            inputs=tuple(data["inputs"]),
            pad_token_id=int(data["pad_token_id"]),
            source=data.get("source", ""),
            dimension=data.get("dimension"),
            prompt=PromptTemplate(**prompt) if prompt else None,
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def read(cls, version_dir: Path) -> ModelMetadata:
        """Read ``<version_dir>/tritonrag.json``."""
        return cls.from_dict(json.loads((version_dir / METADATA_FILE).read_text()))


@dataclass(frozen=True)
class Encoding:
    """Token ids (and segment ids) of one model input row."""

    ids: list[int]
    type_ids: list[int]


class ModelTokenizer:
    """Encodes texts or pairs for one exported model version."""

    def __init__(self, tokenizer: Tokenizer, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    @classmethod
    def from_version_dir(cls, version_dir: Path) -> ModelTokenizer:
        """Load the tokenizer and metadata that export wrote into ``version_dir``."""
        metadata = ModelMetadata.read(version_dir)
        return cls(Tokenizer.from_file(str(version_dir / TOKENIZER_FILE)), metadata)

    @property
    def max_length(self) -> int:
        return self.metadata.max_sequence_length

    def _encode_checked(self, text: str, pair: str | None, what: str, truncate: bool) -> Encoding:
        encoding = self._tokenizer.encode(text, pair, add_special_tokens=True)
        if len(encoding.ids) > self.max_length:
            if not truncate:
                raise InputError(
                    f"{what} has {len(encoding.ids)} tokens, over the model's limit of {self.max_length} "
                    f"(truncation is off)"
                )
            # A pair's passage is cut alone while it can take the whole cut; a query that leaves it no room is
            # cut too (the longer first), which "only_second" would refuse.
            overflow = len(encoding.ids) - self.max_length
            room_in_passage = pair is not None and overflow < len(self._ids(pair))
            strategy = "only_second" if room_in_passage else "longest_first"
            self._tokenizer.enable_truncation(self.max_length, strategy=strategy)
            try:
                encoding = self._tokenizer.encode(text, pair, add_special_tokens=True)
            finally:
                self._tokenizer.no_truncation()
        return Encoding(list(encoding.ids), list(encoding.type_ids))

    def encode_text(self, text: str, truncate: bool = True) -> Encoding:
        """Tokens of one text for the embedder."""
        if not text.strip():
            raise InputError("text is empty")
        return self._encode_checked(text, None, "text", truncate)

    def encode_pair(self, query: str, passage: str, truncate: bool = True) -> Encoding:
        """Tokens of one (query, passage) pair for the reranker."""
        if not query.strip():
            raise InputError("query is empty")
        if not passage.strip():
            raise InputError("passage is empty")
        prompt = self.metadata.prompt
        if prompt is None:
            return self._encode_checked(query, passage, "query and passage", truncate)
        return self._encode_prompt(prompt, query, passage, truncate)

    def _ids(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids) if text else []

    def _prefix(self, text: str, tokens: int) -> str:
        """The start of ``text`` that holds its first ``tokens`` tokens."""
        if tokens <= 0:
            return ""
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        return text if tokens >= len(offsets) else text[: offsets[tokens - 1][1]]

    def _encode_prompt(self, prompt: PromptTemplate, query: str, passage: str, truncate: bool) -> Encoding:
        """The prompt with the passage, then the query's own tokens, marked by segment id 1 (the tokens scored).

        The query is tokenised alone, as the text the model is asked to write. When too long, the passage is
        cut at its end first, then the query; the passage keeps what the query leaves, but never less than
        half the room.
        """
        head, middle = prompt.parts()
        query_ids = self._ids(query)
        ids = self._ids(head + passage + middle)
        if len(ids) + len(query_ids) > self.max_length:
            if not truncate:
                raise InputError(
                    f"query and passage have {len(ids) + len(query_ids)} tokens with the prompt, over the model's "
                    f"limit of {self.max_length} (truncation is off)"
                )
            room = self.max_length - len(self._ids(head + middle))
            if room < 2:
                raise InputError(f"the model's limit of {self.max_length} tokens leaves no room for the prompt")
            passage_tokens = max(room - len(query_ids), min(len(self._ids(passage)), room // 2))
            query_ids = query_ids[: room - passage_tokens]
            passage = self._prefix(passage, passage_tokens)
            ids = self._ids(head + passage + middle)
            while len(ids) + len(query_ids) > self.max_length:  # merges across the cut can add a token
                passage = self._prefix(passage, len(self._ids(passage)) - 1)
                ids = self._ids(head + passage + middle)
        return Encoding(ids + query_ids, [0] * len(ids) + [1] * len(query_ids))

    def pad(self, encodings: Sequence[Encoding]) -> dict[str, npt.NDArray[np.int64]]:
        """Right-pad a batch to its longest row; arrays named as the ONNX graph's inputs."""
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self.metadata.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
            types[row, :n] = encoding.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.metadata.inputs}
