"""Independent PyTorch references for what the served models must return.

They use transformers directly (not the export graph wrappers), so a test that compares
served output with them checks the whole path: export, ONNX, tokenisation and batching.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from tritonrag.export.runtime.encoding import ModelTokenizer


@torch.inference_mode()
def embeddings(model_dir: Path, texts: list[str], max_length: int) -> npt.NDArray[np.float32]:
    """Mean-pooled, L2-normalised embeddings as sentence-transformers computes them."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    result: npt.NDArray[np.float32] = torch.nn.functional.normalize(pooled, dim=1).numpy()
    return result


@torch.inference_mode()
def cross_encoder_scores(model_dir: Path, pairs: list[tuple[str, str]], max_length: int) -> npt.NDArray[np.float32]:
    """Scores of a sequence-classification cross-encoder (one logit per pair)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    queries, passages = zip(*pairs, strict=True)
    batch = tokenizer(
        list(queries),
        list(passages),
        padding=True,
        truncation="only_second",
        max_length=max_length,
        return_tensors="pt",
    )
    result: npt.NDArray[np.float32] = model(**batch).logits[:, 0].numpy()
    return result


class YesNoReference:
    """A causal LM scoring relevance as logit("yes") - logit("no") after the exported prompt."""

    def __init__(self, model: PreTrainedModel, version_dir: Path, yes_id: int, no_id: int) -> None:
        self.model = model.eval()  # type: ignore[no-untyped-call]
        self.tokenizer = ModelTokenizer.from_version_dir(version_dir)
        self.yes_id = yes_id
        self.no_id = no_id

    @torch.inference_mode()
    def scores(self, pairs: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        """One pair at a time, unpadded, so padding cannot hide a bug in the served graph."""
        result = []
        for query, passage in pairs:
            ids = torch.tensor([self.tokenizer.encode_pair(query, passage).ids])
            logits = self.model(input_ids=ids).logits[0, -1]
            result.append(float(logits[self.yes_id] - logits[self.no_id]))
        return np.array(result, dtype=np.float32)
