"""The generator model's request contract, shared with the orchestrator that calls it.

Inputs: ``PROMPT`` (raw text) or ``MESSAGES`` (JSON ``[{"role", "content"}]``, rendered with the
model's chat template), and ``PARAMETERS`` (JSON sampling parameters). Streamed outputs per response:
``TEXT`` (the new text), ``FINISH_REASON`` (empty until the last response), ``PROMPT_TOKENS`` and
``COMPLETION_TOKENS``.

Triton's gRPC stream carries a model's error as a message without its status code, so the
generator starts the message of each error a caller must tell apart with one of these prefixes.
"""

from __future__ import annotations

INPUT_ERROR = "invalid input: "  # the request is wrong; do not retry
BUSY_ERROR = "generator busy: "  # the wait queue is full; another endpoint, or later, may take it
