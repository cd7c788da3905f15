"""Triton model ``embedder``: ``TEXT`` rows in, L2-normalised ``EMBEDDING`` vectors out."""

from __future__ import annotations

from typing import Any

from .encoding import Encoding, InputError
from .text_model import TextModel, decode_strings


class TritonPythonModel(TextModel):
    """The embedder; pooling and normalisation happen inside the ONNX graph."""

    output_name = "EMBEDDING"

    def encode_request(self, request: Any) -> list[Encoding]:
        texts = decode_strings(request, "TEXT")
        encodings = []
        for row, text in enumerate(texts):
            try:
                encodings.append(self.tokenizer.encode_text(text, truncate=self.truncate))
            except InputError as exc:
                raise InputError(f"TEXT[{row}]: {exc}") from exc
        return encodings
