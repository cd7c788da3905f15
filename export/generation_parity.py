"""Export-time parity of a generator: greedy continuations of fixed prompts, token for token.

The reference is transformers' ``generate()`` in PyTorch, each prompt alone. The candidate is the
served decoding path itself: the continuous-batching engine over the ONNX graph, with every prompt
in the batch at once, so left padding, per-row positions and rows joining and leaving are checked too,
and with each prompt alone, so decode steps of one row (a generator's one-row graph) are checked too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from .errors import ExportError
from .runtime.chat import ChatTemplate
from .runtime.contract import TOKENIZER_FILE
from .runtime.decoding import CacheShape
from .runtime.encoding import ModelMetadata
from .runtime.engine import GenerationEngine, GenerationRequest
from .runtime.sampling import SamplingParams

QUESTIONS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Explain in a few words why the sky is blue.",
)
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class PromptSet:
    """The parity prompts as the served model sees them: rendered with the chat template, then tokenised."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, tokenizer: Tokenizer, metadata: ModelMetadata) -> PromptSet:
        template = metadata.extra.get("chat_template")
        if template:
            chat = ChatTemplate(template, metadata.extra.get("bos_token", ""), metadata.extra.get("eos_token", ""))
            texts = tuple(chat.render([{"role": "user", "content": q}]) for q in QUESTIONS)
        else:
            texts = QUESTIONS
        return cls(texts, tuple(tuple(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts))


def _tokens_before_difference(got: list[int], reference: list[int]) -> int:
    """How many tokens ``got`` shares with ``reference`` before their first difference."""
    return next(
        (i for i, (x, y) in enumerate(zip(got, reference, strict=False)) if x != y), min(len(got), len(reference))
    )


class GenerationParity:
    """Greedy reference continuations from PyTorch, compared with the engine's over an ONNX file."""

    def __init__(self, model: PreTrainedModel, version_dir: Path, shape: CacheShape) -> None:
        self.version_dir = version_dir
        self.shape = shape
        self.metadata = ModelMetadata.read(version_dir)
        self.prompts = PromptSet.build(Tokenizer.from_file(str(version_dir / TOKENIZER_FILE)), self.metadata)
        stop_ids = list(self.metadata.extra["stop_token_ids"])
        self.reference: list[list[int]] = []
        with torch.inference_mode():
            for ids in self.prompts.ids:
                prompt = torch.tensor([ids], dtype=torch.long)
                output = model.generate(  # type: ignore[operator]
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=stop_ids,
                    pad_token_id=self.metadata.pad_token_id,
                )
                self.reference.append(output[0, len(ids) :].tolist())

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """A decode-shaped example for the exporter: 2 rows, 3 new tokens after 4 cached ones."""
        rows, new, past = 2, 3, 4
        ids = torch.tensor([self.prompts.ids[0][:new], self.prompts.ids[1][:new]], dtype=torch.long)
        mask = torch.ones((rows, past + new), dtype=torch.long)
        positions = torch.arange(past, past + new).repeat(rows, 1)
        cache_shape = (rows, self.shape.num_kv_heads, past, self.shape.head_dim)
        generator = torch.Generator().manual_seed(0)
        cache = [torch.randn(cache_shape, generator=generator) for _ in self.shape.past_names()]
        return (ids, mask, positions, *cache)

    def continuations(self, onnx_file: Path, together: bool) -> list[list[int]]:
        """The engine's greedy continuations of every prompt: all submitted at once, or each alone (decode
        steps of one row, which run a generator's one-row graph where it has one)."""
        engine = GenerationEngine.from_version_dir(self.version_dir, onnx_file, max_sequences=len(QUESTIONS))
        requests = [
            GenerationRequest(list(ids), SamplingParams(max_tokens=MAX_NEW_TOKENS), emit=lambda *_: None)
            for ids in self.prompts.ids
        ]
        for request in requests:
            engine.submit(request)
            if not together:
                engine.run_until_idle()
        engine.run_until_idle()
        return [request.generated for request in requests]

    def _report(self, onnx_file: Path) -> dict[str, Any]:
        """A prompt counts as identical when both its continuations, batched and alone, equal PyTorch's."""
        runs = [self.continuations(onnx_file, together) for together in (True, False)]
        same = [all(run[i] == reference for run in runs) for i, reference in enumerate(self.reference)]
        matching = sum(
            min(_tokens_before_difference(run[p], reference) for run in runs)
            for p, reference in enumerate(self.reference)
        )
        return {
            "metric": "greedy_identical",
            "value": sum(same) / len(same),
            "prompts": len(same),
            "max_new_tokens": MAX_NEW_TOKENS,
            "tokens_before_first_difference": matching,
            "reference_tokens": sum(len(r) for r in self.reference),
        }

    def check(self, onnx_file: Path) -> dict[str, Any]:
        """Float32 parity: every greedy continuation identical, or ``ExportError``."""
        report = self._report(onnx_file)
        report["threshold"] = 1.0
        if report["value"] < 1.0:
            raise ExportError(f"{onnx_file.name}: greedy output differs from PyTorch's: {report}")
        return report

    def check_quantized(self, onnx_file: Path) -> dict[str, Any]:
        """Quantised parity, reported only: quantisation may change greedy choices."""
        report = self._report(onnx_file)
        report["threshold"] = None
        return report
