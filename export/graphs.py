"""Torch modules that put each model's final head inside the exported graph.

The text graphs take ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has them, or
where a query-likelihood reranker marks the query's tokens), right-padded int64 ``[batch, sequence]``, and
return the served result: L2-normalised embeddings ``[batch, dimension]`` or one relevance score per row
``[batch, 1]``. The generator's graph is one decoding step with a KV cache (``DecoderGraph``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
)

from .errors import ExportError

Task = Literal["embedder", "reranker", "generator"]
Head = Literal["mean_pool", "cls_pool", "sequence_classification", "generative_query_likelihood", "causal_lm"]

OUTPUT_NAMES: dict[Task, str] = {"embedder": "sentence_embedding", "reranker": "score"}
AUTO_CLASSES: dict[Head, Any] = {
    "mean_pool": AutoModel,
    "cls_pool": AutoModel,
    "sequence_classification": AutoModelForSequenceClassification,
    "generative_query_likelihood": AutoModelForCausalLM,
    "causal_lm": AutoModelForCausalLM,
}


def select_head(task: Task, config: PretrainedConfig, folder: Path, gguf: bool) -> Head:
    """The head for ``task``: pooling from sentence-transformers' ``1_Pooling/config.json`` (mean when absent);
    for rerankers, sequence classification or query likelihood under a causal LM (GGUF files hold causal LMs)."""
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
    causal = gguf or any(name.endswith("ForCausalLM") for name in architectures)
    if task == "generator":
        if not causal:
            raise ExportError(f"a generator needs a causal LM; the model is {architectures}")
        return "causal_lm"
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "sequence_classification"
    if causal:
        return "generative_query_likelihood"
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


class QueryLikelihoodGraph(nn.Module):
    """Causal-LM score: the mean log-probability of the query's tokens after the instruction and the passage.

    ``token_type_ids`` is 1 at the query's tokens (rows are right-padded). Only the hidden states that predict
    a query token are projected onto the vocabulary, ``[query tokens in the batch, vocabulary]``; the graph
    never holds logits for every position.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model.base_model
        projection = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        if not isinstance(projection, nn.Linear):
            raise ExportError(f"the model's output projection is a {type(projection).__name__}, not a linear layer")
        # Its own copy of the weights: dynamic int8 quantisation mis-scales an embedding table it shares.
        self.projection = nn.Linear(projection.in_features, projection.out_features, projection.bias is not None)
        self.projection.load_state_dict(projection.state_dict())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = token_type_ids[:, 1:] == 1  # position p predicts token p + 1
        logits = self.projection(hidden[:, :-1][targets]).float()
        token_scores = logits.log_softmax(dim=-1).gather(-1, input_ids[:, 1:][targets].unsqueeze(-1)).squeeze(-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(-1).expand_as(targets)[targets]
        totals = torch.zeros(input_ids.shape[0], device=input_ids.device).index_add(0, rows, token_scores)
        counts = targets.sum(dim=1).clamp(min=1).to(totals.dtype)
        return (totals / counts).unsqueeze(-1)


GROUPED_ATTENTION = "tritonrag_grouped"


def grouped_query_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention for grouped-query models without copying each KV head once per query head.

    transformers' eager path repeats keys and values to the number of query heads; in a decoding
    step that copy of the whole cache costs more than the attention itself. Here the query heads
    that share a KV head are stacked along the query axis instead (head ``h`` uses KV head
    ``h // groups``, as ``repeat_kv`` orders them), so the cache is read once, as it is.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * length, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores.reshape(batch, kv_heads, groups, length, -1) + attention_mask[:, :, None, :, : key.shape[-2]]
        scores = scores.reshape(batch, kv_heads, groups * length, -1)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probs, value).reshape(batch, heads, length, dim)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_ATTENTION, grouped_query_attention)


class DecoderGraph(nn.Module):
    """One decoding step with a KV cache: ``(input_ids, attention_mask, position_ids, *past)`` →
    ``(logits, *present)``.

    ``past`` is each layer's key then value ``[batch, kv_heads, past, head_dim]``; ``attention_mask``
    ``[batch, past + sequence]`` marks real tokens (rows are left-padded); ``position_ids`` are explicit,
    so padding does not shift positions. The causal mask is built here as an additive float mask,
    which the model takes as it is. Only the last position is projected onto the vocabulary.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)

    @contextmanager
    def grouped_attention(self) -> Iterator[None]:
        """Trace with ``grouped_query_attention`` (the same numbers as eager, less copying), then restore."""
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(GROUPED_ATTENTION)  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)  # type: ignore[operator]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        past_length, new = past[0].shape[2], input_ids.shape[1]
        keys = torch.arange(past_length + new, device=input_ids.device)
        queries = torch.arange(new, device=input_ids.device) + past_length
        allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        blocked = torch.tensor(torch.finfo(torch.float32).min, device=input_ids.device)
        mask = torch.where(allowed, torch.tensor(0.0, device=input_ids.device), blocked)
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (output.logits[:, -1, :], *present)


def build_graph(head: Head, model: PreTrainedModel) -> nn.Module:
    """The module to export for ``head``."""
    graph: nn.Module
    if head in ("mean_pool", "cls_pool"):
        graph = EmbedderGraph(model, "mean" if head == "mean_pool" else "cls")
    elif head == "sequence_classification":
        graph = SequenceClassificationGraph(model)
    elif head == "causal_lm":
        graph = DecoderGraph(model)
    else:
        graph = QueryLikelihoodGraph(model)
    return graph.eval()
