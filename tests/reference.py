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


class QueryLikelihoodReference:
    """A causal LM scoring relevance as the mean log-probability of the query's tokens after the exported prompt."""

    def __init__(self, model: PreTrainedModel, version_dir: Path) -> None:
        self.model = model.eval()  # type: ignore[no-untyped-call]
        self.tokenizer = ModelTokenizer.from_version_dir(version_dir)

    @torch.inference_mode()
    def scores(self, pairs: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        """One pair at a time, unpadded, with logits at every position, so that neither padding nor the graph's
        selection of query positions can hide a bug in the served graph."""
        result = []
        for query, passage in pairs:
            encoding = self.tokenizer.encode_pair(query, passage)
            log_probs = self.model(input_ids=torch.tensor([encoding.ids])).logits[0].log_softmax(dim=-1)
            scored = [p for p, segment in enumerate(encoding.type_ids) if segment == 1]
            result.append(float(np.mean([float(log_probs[p - 1, encoding.ids[p]]) for p in scored])))
        return np.array(result, dtype=np.float32)
