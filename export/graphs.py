"""Torch modules that put each model's final head inside the exported graph.

Every graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has them),
right-padded int64 ``[batch, sequence]``, and returns the served result: L2-normalised embeddings
``[batch, dimension]`` or one relevance score per row ``[batch, 1]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from .errors import ExportError

Task = Literal["embedder", "reranker"]
Head = Literal["mean_pool", "cls_pool", "sequence_classification", "generative_yes_no"]

OUTPUT_NAMES: dict[Task, str] = {"embedder": "sentence_embedding", "reranker": "score"}
AUTO_CLASSES: dict[Head, Any] = {
    "mean_pool": AutoModel,
    "cls_pool": AutoModel,
    "sequence_classification": AutoModelForSequenceClassification,
    "generative_yes_no": AutoModelForCausalLM,
}


def select_head(task: Task, config: PretrainedConfig, folder: Path, gguf: bool) -> Head:
    """The head for ``task``: pooling from sentence-transformers' ``1_Pooling/config.json`` (mean when absent);
    for rerankers, sequence classification or yes/no scoring by a causal LM (GGUF files hold causal LMs)."""
    if task == "embedder":
        pooling_file = folder / "1_Pooling" / "config.json"
        if not pooling_file.is_file():
            return "mean_pool"
        pooling = json.loads(pooling_file.read_text())
        if pooling.get("pooling_mode_mean_tokens"):
            return "mean_pool"
        if pooling.get("pooling_mode_cls_token"):
            return "cls_pool"
        raise ExportError(f"{pooling_file}: only mean or CLS pooling is supported; it says {pooling}")
    architectures = config.architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "sequence_classification"
    if gguf or any(name.endswith("ForCausalLM") for name in architectures):
        return "generative_yes_no"
    raise ExportError(
        f"a reranker needs a sequence-classification cross-encoder or a causal LM; the model is {architectures}"
    )


def _model_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return inputs


class EmbedderGraph(nn.Module):
    """Encoder, then mean pooling over the attention mask (or the first token), then L2 normalisation."""

    def __init__(self, model: PreTrainedModel, pooling: Literal["mean", "cls"]) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.model(**_model_inputs(input_ids, attention_mask, token_type_ids)).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


class SequenceClassificationGraph(nn.Module):
    """Cross-encoder score: the single logit, or the last label's logit minus the first's."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.num_labels = int(model.config.num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits: torch.Tensor = self.model(**_model_inputs(input_ids, attention_mask, token_type_ids)).logits
        if self.num_labels == 1:
            return logits[:, :1]
        return logits[:, -1:] - logits[:, :1]


class YesNoGraph(nn.Module):
    """Causal-LM score: logit("yes") - logit("no") at each row's last real token (rows are right-padded).

    The difference of two logits is one dot product with the difference of their output-embedding rows,
    so the graph holds that vector instead of projecting onto the whole vocabulary.
    """

    def __init__(self, model: PreTrainedModel, yes_id: int, no_id: int) -> None:
        super().__init__()
        self.model = model.base_model
        projection = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        if not isinstance(projection, nn.Linear):
            raise ExportError(f"the model's output projection is a {type(projection).__name__}, not a linear layer")
        with torch.no_grad():
            direction = projection.weight[yes_id] - projection.weight[no_id]
            offset = projection.bias[yes_id] - projection.bias[no_id] if projection.bias is not None else 0.0
        self.register_buffer("direction", direction.detach().clone().unsqueeze(-1))
        self.offset = float(offset)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = _model_inputs(input_ids, attention_mask, token_type_ids)
        hidden = self.model(**inputs, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        score: torch.Tensor = hidden[rows, last] @ self.direction + self.offset
        return score


def build_graph(head: Head, model: PreTrainedModel, answer_ids: tuple[int, int] | None = None) -> nn.Module:
    """The module to export for ``head``; ``answer_ids`` (yes, no) is needed by ``generative_yes_no``."""
    graph: nn.Module
    if head in ("mean_pool", "cls_pool"):
        graph = EmbedderGraph(model, "mean" if head == "mean_pool" else "cls")
    elif head == "sequence_classification":
        graph = SequenceClassificationGraph(model)
    elif answer_ids is None:
        raise ExportError("generative_yes_no needs the token ids of the answers yes and no")
    else:
        graph = YesNoGraph(model, *answer_ids)
    return graph.eval()
