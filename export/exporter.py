"""``export_model``: a model source → ONNX (optionally quantised) → a new, parity-checked version directory."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from .convert import export_onnx, onnx_files, quantize_int8, quantize_weights, text_dynamic_shapes
from .errors import ExportError
from .generation_parity import GenerationParity
from .graphs import AUTO_CLASSES, OUTPUT_NAMES, DecoderGraph, Head, Task, build_graph, select_head
from .group_query import add_position_logits, builds_group_query, write_group_query_graph
from .native import write_native
from .packed_weights import write_packed_graph
from .parity import ParityCheck, ParityThresholds
from .prompt import render_prompt
from .repository import RUNTIME_PACKAGE, ensure_config, publish, staging_dir, write_json, write_runtime
from .runtime.contract import GROUP_QUERY_ATTENTION, METADATA_FILE, ONE_ROW_ONNX_FILE, ONNX_FILE, TOKENIZER_FILE
from .runtime.decoding import CacheShape
from .runtime.encoding import ModelTokenizer
from .sources import ModelSource, resolve_source

__all__ = ["ExportError", "ExportResult", "ParityThresholds", "export_model"]

Quantization = Literal["int8", "int4"]
Target = Literal["python", "native"]

DEFAULT_MAX_SEQUENCE_LENGTH = 512
DEFAULT_CONTEXT_WINDOW = 2048  # generator: prompt plus completion
DEFAULT_THRESHOLDS = ParityThresholds()
# The generator's weight-only quantisation: blocks of 32 weights along the input axis, multiplied in int8
# (accuracy level 4). Chosen by bench/generator_quantization.py (docs/BENCHMARKS.md, "Quantised generator").
GENERATOR_BLOCK_SIZE = 32
GENERATOR_ACCURACY_LEVEL = 4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """A published version: its number and directory, and the parity reports (``fp32``, and ``int8`` if any)."""

    model_name: str
    version: int
    version_dir: Path
    parity: dict[str, dict[str, Any]]
    native_dirs: tuple[Path, ...] = field(default=())


def export_model(
    source: str,
    task: Task,
    repository: Path,
    model_name: str | None = None,
    quantize: Quantization | None = None,
    target: Target = "python",
    max_sequence_length: int | None = None,
    native_repository: Path | None = None,
    thresholds: ParityThresholds = DEFAULT_THRESHOLDS,
    *,
    runtime_dir: Path = RUNTIME_PACKAGE,
) -> ExportResult:
    """Export ``source`` as ``task`` into ``<repository>/<model_name or task>/<N>/``.

    The version holds ``model.onnx`` (head inside), ``tokenizer.json``, ``tritonrag.json``, ``runtime/`` (a
    copy of ``runtime_dir``'s Python files, by default the installed ``tritonrag.export.runtime``) and a
    ``model.py`` that serves the version with that copy. It appears only once the ONNX graph matched PyTorch
    (``thresholds``); on any error nothing is left. ``target="native"`` also writes tokenizer, ONNX and
    ensemble models into ``native_repository``.
    """
    name = model_name or task
    _check_choices(task, name, quantize, target, native_repository)
    started = time.monotonic()
    resolved = resolve_source(source)
    config = resolved.load_config()
    head = select_head(task, config, resolved.folder, resolved.gguf_file is not None)
    tokenizer = resolved.load_tokenizer()
    log.info("%s: loading the %s model (%s)", source, task, head)
    model = resolved.load_model(AUTO_CLASSES[head])
    metadata = _metadata(resolved, task, head, tokenizer, config, max_sequence_length, quantize)
    graph = build_graph(head, model)
    model_dir = repository / name

    with staging_dir(model_dir) as staging:
        tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_FILE))
        metadata["runtime"] = write_runtime(staging, task, runtime_dir)
        write_json(staging / METADATA_FILE, metadata)
        onnx_file = staging / ONNX_FILE
        parity: _Parity
        if isinstance(graph, DecoderGraph):
            parity = _export_generator(source, graph, tokenizer, onnx_file, metadata)
        else:
            parity = _export_text_model(source, task, graph, onnx_file, metadata, thresholds)
        reports = {"fp32": parity.check(onnx_file)}
        metadata["parity"] = reports["fp32"]
        if quantize is not None:
            method, reports[quantize] = _quantize(
                onnx_file, parity.check_quantized, _quantizers(task, quantize, config)
            )
            metadata["quantization"] = {**method, "weights": quantize, "parity": reports[quantize]}
        write_json(staging / METADATA_FILE, metadata)
        native_dirs: list[Path] = []
        if native_repository is not None:
            output_dims = metadata.get("dimension", 1)
            native_dirs = write_native(
                native_repository, name, task, staging, metadata["inputs"], OUTPUT_NAMES[task], output_dims
            )
        ensure_config(model_dir, task)
        version, version_dir = publish(staging, model_dir)
    log.info("%s: wrote %s in %.1f s; parity %s", source, version_dir, time.monotonic() - started, reports)
    return ExportResult(name, version, version_dir, reports, tuple(native_dirs))


class _Parity(Protocol):
    """An export's parity check: float32 (raises when off) and quantised (reported, or raises below a floor)."""

    def check(self, onnx_file: Path) -> dict[str, Any]: ...
    def check_quantized(self, onnx_file: Path) -> dict[str, Any]: ...


def _export_text_model(
    source: str,
    task: Task,
    graph: torch.nn.Module,
    onnx_file: Path,
    metadata: dict[str, Any],
    thresholds: ParityThresholds,
) -> ParityCheck:
    """Embedder or reranker: write the graph, put an embedder's width in ``metadata``; its parity check."""
    parity = ParityCheck(task, graph, ModelTokenizer.from_version_dir(onnx_file.parent), thresholds)
    inputs = parity.torch_inputs()
    log.info("%s: exporting to ONNX", source)
    export_onnx(
        graph, tuple(inputs.values()), list(inputs), [OUTPUT_NAMES[task]], text_dynamic_shapes(inputs), onnx_file
    )
    if task == "embedder":
        metadata["dimension"] = int(parity.reference.shape[-1])
    return parity


def _export_generator(
    source: str,
    graph: DecoderGraph,
    tokenizer: PreTrainedTokenizerFast,
    onnx_file: Path,
    metadata: dict[str, Any],
) -> GenerationParity:
    """Generator: write the KV-cache decoder graph (``GroupQueryAttention`` where the builder takes the
    architecture, else traced from transformers' attention), and beside a ``GroupQueryAttention`` graph its
    one-row twin with the weights that lie on a block grid packed (``packed_weights``); its greedy parity
    check, which runs both."""
    shape = CacheShape(metadata["num_layers"], metadata["num_kv_heads"], metadata["head_dim"])
    log.info("%s: greedy reference continuations in PyTorch", source)
    parity = GenerationParity(graph.model, onnx_file.parent, shape)
    if metadata.get("attention") == GROUP_QUERY_ATTENTION:
        log.info("%s: building the GroupQueryAttention decoder (onnxruntime-genai's model builder)", source)
        write_group_query_graph(graph.model, tokenizer, onnx_file)
        packed = write_packed_graph(onnx_file, onnx_file.with_name(ONE_ROW_ONNX_FILE))
        log.info("%s: packed %d of %d MatMul weights for one-row steps", source, packed.packed, packed.matmuls)
        add_position_logits(onnx_file)  # after packing: the one-row graph checks no drafts
        if packed.packed:
            metadata["one_row_graph"] = {"packed_matmuls": packed.packed, "matmuls": packed.matmuls}
            write_json(onnx_file.parent / METADATA_FILE, metadata)
        return parity
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    total, past = torch.export.Dim("total"), torch.export.Dim("past")
    dynamic_shapes = (
        {0: batch, 1: sequence},
        {0: batch, 1: total},
        {0: batch, 1: sequence},
        tuple({0: batch, 2: past} for _ in shape.past_names()),
    )
    names = ["input_ids", "attention_mask", "position_ids", *shape.past_names()]
    log.info("%s: exporting the decoder to ONNX", source)
    with graph.grouped_attention():
        export_onnx(
            graph, parity.example_inputs(), names, ["logits", *shape.present_names()], dynamic_shapes, onnx_file
        )
    return parity


def _check_choices(task: str, name: str, quantize: str | None, target: str, native_repository: Path | None) -> None:
    if task not in get_args(Task):
        raise ExportError(f"unknown task {task!r}: expected one of {get_args(Task)}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        raise ExportError(f"bad model name {name!r}: use letters, digits, '_', '-' and '.', not first")
    if quantize is not None and quantize not in get_args(Quantization):
        raise ExportError(f"unknown quantization {quantize!r}: expected one of {get_args(Quantization)}")
    if quantize == "int4" and task != "generator":
        raise ExportError("int4 quantisation is for the generator; an embedder or reranker takes int8")
    if target not in get_args(Target):
        raise ExportError(f"unknown target {target!r}: expected one of {get_args(Target)}")
    if (target == "native") != (native_repository is not None):
        raise ExportError("native_repository is required with target='native', and only then")
    if target == "native" and task == "generator":
        raise ExportError("the generator has no native target: its continuous batching runs in the Python backend")


def _ffn_down_shape(config: PretrainedConfig) -> tuple[int, int] | None:
    """The weight shape of the FFN down-projection, ``(intermediate_size, hidden_size)``, where the config says."""
    intermediate, hidden = getattr(config, "intermediate_size", None), getattr(config, "hidden_size", None)
    return (int(intermediate), int(hidden)) if intermediate and hidden else None


Quantizer = tuple[Callable[[Path, Path], None], dict[str, Any]]  # writes (source, target); its metadata entry


def _quantizers(task: Task, quantize: Quantization, config: PretrainedConfig) -> list[Quantizer]:
    """How ``task`` may be quantised, the first choice first: each the function that writes the quantised file,
    and its ``tritonrag.json`` entry.

    The generator's weights go to int8 or int4 blocks (``MatMulNBits``): decoding one token reads every weight,
    so fewer bytes per weight are the speed-up. Encoders take dynamic int8, quantising activations too. An
    embedder first has every MatMul quantised (about 2x float32's speed on a CPU with VNNI, 1.6x with the FFN
    down-projections left float32: docs/BENCHMARKS.md); where that misses the parity gate (on a CPU without
    VNNI, whose int8 products saturate on the large activations that feed those projections), they stay
    float32. A reranker keeps them float32: its scores are reported, not gated.
    """
    if task == "generator":
        bits = {"int8": 8, "int4": 4}[quantize]
        write = partial(
            quantize_weights, bits=bits, block_size=GENERATOR_BLOCK_SIZE, accuracy_level=GENERATOR_ACCURACY_LEVEL
        )
        method = {
            "method": "weight_only",
            "block_size": GENERATOR_BLOCK_SIZE,
            "accuracy_level": GENERATOR_ACCURACY_LEVEL,
        }
        return [(write, method)]
    ffn_down = _ffn_down_shape(config)
    keep_ffn_down: Quantizer = (
        partial(quantize_int8, float_weight_shape=ffn_down),
        {"method": "dynamic", "float32_layers": ["ffn_down"] if ffn_down else []},
    )
    every_matmul: Quantizer = (quantize_int8, {"method": "dynamic", "float32_layers": []})
    return [every_matmul, keep_ffn_down] if task == "embedder" and ffn_down else [keep_ffn_down]


def _quantize(
    onnx_file: Path, check: Callable[[Path], dict[str, Any]], quantizers: Sequence[Quantizer]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace ``onnx_file`` by its quantised version by the first of ``quantizers`` whose output passes
    ``check``; returns that quantizer's metadata entry and the check's report. The last one's failure raises."""
    quantized_dir = onnx_file.parent / "quantized"
    quantized_dir.mkdir()
    quantized_file = quantized_dir / onnx_file.name
    for attempt, (write_quantized, method) in enumerate(quantizers, start=1):
        write_quantized(onnx_file, quantized_file)
        try:
            report = check(quantized_file)
            break
        except ExportError as exc:
            if attempt == len(quantizers):
                raise
            log.info("%s: quantised %s, it missed the parity gate (%s); trying the next way", onnx_file, method, exc)
            for path in onnx_files(quantized_file):
                path.unlink()
    for path in onnx_files(onnx_file):
        path.unlink()
    for path in onnx_files(quantized_file):
        path.rename(onnx_file.parent / path.name)
    quantized_dir.rmdir()
    return method, report


def _metadata(
    source: ModelSource,
    task: Task,
    head: Head,
    tokenizer: PreTrainedTokenizerFast,
    config: PretrainedConfig,
    max_sequence_length: int | None,
    quantize: Quantization | None,
) -> dict[str, Any]:
    """``tritonrag.json`` before the export: what serving needs to tokenise for the graph."""
    inputs = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names:
        inputs.append("token_type_ids")
    pad_ids = (tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id, 0)
    metadata: dict[str, Any] = {
        "task": task,
        "head": head,
        "source": source.spec,
        "max_sequence_length": _max_sequence_length(source, task, tokenizer, config, max_sequence_length),
        "inputs": inputs,
        "pad_token_id": next(int(i) for i in pad_ids if i is not None),
        "quantization": None,
    }
    if head == "generative_query_likelihood":
        metadata["prompt"] = render_prompt(tokenizer)
        metadata["inputs"] = ["input_ids", "attention_mask", "token_type_ids"]  # segment 1: the query's tokens
    if head == "causal_lm":
        metadata.update(_generator_metadata(tokenizer, config, quantize))
    return metadata


def _generator_metadata(
    tokenizer: PreTrainedTokenizerFast, config: PretrainedConfig, quantize: Quantization | None
) -> dict[str, Any]:
    """What the generator's engine and the orchestrator's prompt packing need besides the graph.

    A float32 generator of an architecture the builder takes gets the ``GroupQueryAttention`` graph. A quantised
    one keeps the graph traced from transformers: with int8 weights the builder's graph (its fused projections
    round differently) dropped the citation of tests/e2e/test_generation.py's grounded answer, which the traced
    int8 graph keeps (docs/BENCHMARKS.md, "In-place KV cache")."""
    heads = int(config.num_attention_heads)
    stop_ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        stop_ids.update([value] if isinstance(value, int) else value or [])
    if not stop_ids:
        raise ExportError("the model names no end-of-sequence token, so a generation could not stop by itself")
    group_query = {"attention": GROUP_QUERY_ATTENTION} if quantize is None and builds_group_query(config) else {}
    return {
        **group_query,
        "inputs": ["input_ids", "attention_mask", *([] if group_query else ["position_ids"])],
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "vocab_size": int(config.vocab_size),
        "stop_token_ids": sorted(stop_ids),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
    }


def _max_sequence_length(
    source: ModelSource, task: Task, tokenizer: PreTrainedTokenizerFast, config: PretrainedConfig, requested: int | None
) -> int:
    """``requested``, else the smallest of sentence-transformers' ``max_seq_length``, the tokenizer's and the
    model's limits and ``DEFAULT_MAX_SEQUENCE_LENGTH`` (``DEFAULT_CONTEXT_WINDOW`` for a generator)."""
    positions = getattr(config, "max_position_embeddings", None)
    if requested is not None:
        if requested < 1 or (positions is not None and requested > positions):
            raise ExportError(f"max_sequence_length {requested} is outside 1..{positions} for this model")
        return requested
    limits = [DEFAULT_CONTEXT_WINDOW if task == "generator" else DEFAULT_MAX_SEQUENCE_LENGTH]
    if positions is not None:
        limits.append(int(positions))
    if tokenizer.model_max_length < 1_000_000:  # transformers uses a huge number for "no limit"
        limits.append(int(tokenizer.model_max_length))
    st_config = source.folder / "sentence_bert_config.json"
    if st_config.is_file():
        limits.append(int(json.loads(st_config.read_text())["max_seq_length"]))
    return min(limits)
