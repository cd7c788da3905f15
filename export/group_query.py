"""The generator's decoder graph built on ``GroupQueryAttention``, by onnxruntime-genai's model builder.

The builder (ONNX Runtime's own, maintained with its contrib operators) writes a decoder whose attention is
one ``GroupQueryAttention`` node per layer, rotary embedding inside, projections fused, and whose KV cache
inputs and outputs may be one buffer: the engine's ``SlotDecoder`` keeps the running sequences' caches in
place instead of copying them every step (docs/BENCHMARKS.md, "In-place KV cache"). Only the last position
is projected onto the vocabulary (``prune_lm_head``), and every position on request (``add_position_logits``,
for checking a draft of several tokens: ``tritonrag.export.runtime.prompt_lookup``). Architectures outside
``MODEL_TYPES``, and exports on a machine with ONNX Runtime's CUDA provider, keep the graph traced from
transformers' attention.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from .convert import external_data_file
from .errors import ExportError
from .runtime.decoding import ALL_POSITIONS, POSITION_LOGITS

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


def add_position_logits(onnx_file: Path) -> None:
    """Give the decoder graph of ``onnx_file`` the output ``POSITION_LOGITS`` (the logits of every fed position),
    computed only when its input ``ALL_POSITIONS`` is set: an ``If`` whose other branch is empty, because ONNX
    Runtime runs every node of a graph, asked-for outputs or not, and projecting a whole prompt onto the
    vocabulary would slow each prefill by a fifth. Written in place; the weights file is untouched."""
    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    head = producers["logits"]  # MatMul(Unsqueeze(Gather(hidden, -1)), weight): the builder's pruned head
    hidden = producers[producers[head.input[0]].input[0]].input[0]
    vocabulary = next(init.dims[-1] for init in graph.initializer if init.name == head.input[1])
    every = helper.make_graph(
        [helper.make_node("MatMul", [hidden, head.input[1]], ["every_position"])],
        "every_position",
        [],
        [helper.make_tensor_value_info("every_position", TensorProto.FLOAT, None)],
    )
    empty = numpy_helper.from_array(np.zeros((0, 0, vocabulary), np.float32))
    none = helper.make_graph(
        [helper.make_node("Constant", [], ["no_position"], value=empty)],
        "no_position",
        [],
        [helper.make_tensor_value_info("no_position", TensorProto.FLOAT, None)],
    )
    graph.node.append(
        helper.make_node(
            "If", [ALL_POSITIONS], [POSITION_LOGITS], name="/lm_head/positions/If", then_branch=every, else_branch=none
        )
    )
    graph.input.append(helper.make_tensor_value_info(ALL_POSITIONS, TensorProto.BOOL, []))
    graph.initializer.append(numpy_helper.from_array(np.array(False), ALL_POSITIONS))  # the input's default
    graph.output.append(
        helper.make_tensor_value_info(POSITION_LOGITS, TensorProto.FLOAT, ["batch_size", "sequence_length", vocabulary])
    )
    onnx.save(model, str(onnx_file))
