"""The generator's decoder graph built on ``GroupQueryAttention``, by onnxruntime-genai's model builder.

The builder (ONNX Runtime's own, maintained with its contrib operators) writes a decoder whose attention is
one ``GroupQueryAttention`` node per layer, rotary embedding inside, projections fused, and whose KV cache
inputs and outputs may be one buffer: the engine's ``SlotDecoder`` keeps the running sequences' caches in
place instead of copying them every step (docs/BENCHMARKS.md, "In-place KV cache"). Only the last position
is projected onto the vocabulary (``prune_lm_head``). Architectures outside ``MODEL_TYPES``, and exports on a
machine with ONNX Runtime's CUDA provider, keep the graph traced from transformers' attention.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import onnxruntime as ort
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from .convert import external_data_file
from .errors import ExportError

# The builder's architectures that the engine has been checked on (export parity: greedy identical).
MODEL_TYPES = frozenset({"llama"})
_BUILT_GRAPH = "model.onnx"


def builds_group_query(config: PretrainedConfig) -> bool:
    """Whether the generator of ``config`` is exported through the builder: an architecture it takes, exported
    where ONNX Runtime has no CUDA provider (its CUDA ``GroupQueryAttention`` takes float16 only, so a float32
    graph would run those nodes on the CPU; a GPU machine keeps the traced graph)."""
    return (
        str(getattr(config, "model_type", "")) in MODEL_TYPES
        and "CUDAExecutionProvider" not in ort.get_available_providers()
    )


def write_group_query_graph(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, onnx_file: Path) -> None:
    """Write ``model``'s float32 decoder to ``onnx_file`` (weights beside it), through a Hugging Face folder."""
    from onnxruntime_genai.models.builder import create_model  # imports torch and transformers: export only

    with tempfile.TemporaryDirectory(prefix="tritonrag-gqa-") as scratch:
        folder, built = Path(scratch) / "model", Path(scratch) / "onnx"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        printed = io.StringIO()
        try:
            # The builder prints every tensor it reads and writes, and draws progress bars.
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                create_model(
                    None,
                    str(folder),
                    str(built),
                    "fp32",
                    "cpu",
                    str(Path(scratch) / "cache"),
                    prune_lm_head=True,
                    hf_remote=False,
                    hf_token="false",
                )
        except Exception as exc:
            raise ExportError(f"onnxruntime-genai's model builder failed: {exc}\n{printed.getvalue()[-2000:]}") from exc
        for source, target in (
            (built / _BUILT_GRAPH, onnx_file),
            (external_data_file(built / _BUILT_GRAPH), external_data_file(onnx_file)),
        ):
            shutil.move(source, target)
            target.chmod(0o644)  # the builder writes its weights readable by their owner alone
