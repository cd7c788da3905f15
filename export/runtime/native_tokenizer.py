"""Triton model ``<name>_tokenizer`` of ``--target native``: text in, the ONNX graph's int64 inputs out.

Each request is padded on its own; the ensemble passes the tensors to the ``onnxruntime_onnx`` model.
"""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from .encoding import InputError
from .text_model import TokenizingModel, error_response


class TritonPythonModel(TokenizingModel):
    """Tokenises each request of the batch; a bad request gets its own error response."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: a tensor per graph input (``input_ids``, ``attention_mask``, ...)."""
        responses = []
        for item in self.encode_all(requests):
            if isinstance(item, InputError):
                responses.append(error_response(item))
                continue
            tensors = [pb_utils.Tensor(name, array) for name, array in self.tokenizer.pad(item).items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
