"""Triton model ``reranker``: (``QUERY``, ``PASSAGE``) rows in, one relevance ``SCORE`` per row out."""

from __future__ import annotations

from typing import Any

from .encoding import Encoding, InputError
from .text_model import TextModel, decode_strings


class TritonPythonModel(TextModel):
    """The cross-encoder; its scoring head is inside the ONNX graph."""

    output_name = "SCORE"

    def encode_request(self, request: Any) -> list[Encoding]:
        queries = decode_strings(request, "QUERY")
        passages = decode_strings(request, "PASSAGE")
        if len(queries) != len(passages):
            raise InputError(f"QUERY has {len(queries)} rows but PASSAGE has {len(passages)}; they must match")
        encodings = []
        for row, (query, passage) in enumerate(zip(queries, passages, strict=True)):
            try:
                encodings.append(self.tokenizer.encode_pair(query, passage, truncate=self.truncate))
            except InputError as exc:
                raise InputError(f"row {row}: {exc}") from exc
        return encodings
