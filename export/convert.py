"""Torch module → ONNX file, and quantisation of that file: dynamic int8, or weight-only int8/int4 blocks.

The graph is captured with the dynamo exporter (``torch.export``): the legacy TorchScript exporter
produces numerically wrong BERT graphs with this torch. Models over protobuf's 2 GiB limit keep their
weights in ``<file>.data`` beside the graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
from torch import nn

from .errors import ExportError

# protobuf caps one message at 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000


def external_data_file(onnx_file: Path) -> Path:
    """Where the weights of a large model live, beside its graph file."""
    return onnx_file.with_name(onnx_file.name + ".data")


def onnx_files(onnx_file: Path) -> list[Path]:
    """The graph file and, for a large model, its weights file."""
    return [path for path in (onnx_file, external_data_file(onnx_file)) if path.exists()]


def text_dynamic_shapes(inputs: dict[str, torch.Tensor]) -> tuple[dict[int, Any], ...]:
    """Dynamic batch and sequence axes for every input of a text graph."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    return tuple({0: batch, 1: sequence} for _ in inputs)


def export_onnx(
    module: nn.Module,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[Any, ...],
    onnx_file: Path,
) -> None:
    """Export ``module(*args)`` with ``dynamic_shapes`` (one entry per argument), naming inputs and outputs."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with warnings.catch_warnings():
            # Inputs name the same axes on purpose; torch warns that the names are shared.
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        program.save(str(onnx_file), external_data=size > EXTERNAL_DATA_BYTES)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    _drop_weight_shapes(onnx_file)


def _drop_weight_shapes(onnx_file: Path) -> None:
    """Remove the exporter's shape annotations of weights: ONNX Runtime's quantiser transposes Gemm weights
    in place and then fails shape inference against the stale annotation."""
    model = onnx.load(str(onnx_file), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    kept = [info for info in model.graph.value_info if info.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.save(model, str(onnx_file))


def _matmuls_with_weight_shape(onnx_file: Path, shape: tuple[int, int]) -> list[str]:
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    weights = {init.name for init in graph.initializer if tuple(init.dims) == shape}
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def quantize_int8(source: Path, target: Path, float_weight_shape: tuple[int, int] | None = None) -> None:
    """Dynamic quantisation: int8 weights (``QInt8``, per output channel), activations quantised at run time.

    MatMuls whose weight has ``float_weight_shape`` stay float32. Given the FFN down-projection's shape
    ``(intermediate_size, hidden_size)``, that keeps the layers fed by the FFN activation, whose outliers
    one per-tensor activation scale cannot hold (MiniLM, min cosine over 2,000 real chunks: 0.977 with them
    quantised, 0.988 without).
    """
    excluded = _matmuls_with_weight_shape(source, float_weight_shape) if float_weight_shape else []
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=excluded,
        use_external_data_format=external_data_file(source).exists(),
    )


def _fold_transposed_weights(model: onnx.ModelProto) -> None:
    """Replace each ``Transpose`` of a weight by the transposed weight.

    A tied output projection reaches its MatMul as ``Transpose(embedding table)``, and the weight-only
    quantiser quantises only MatMuls whose weight is an initializer: folded, the projection (the largest
    MatMul of a small LM) is quantised too, and the embedding table stays as it is for the ``Gather``.
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in weights:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(weights[node.input[0]])
        transposed = np.ascontiguousarray(array.transpose(perm) if perm else array.T)
        graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        graph.node.remove(node)


def quantize_weights(source: Path, target: Path, bits: int, block_size: int, accuracy_level: int) -> None:
    """Weight-only quantisation of every MatMul with a constant weight (ONNX Runtime's ``MatMulNBits``).

    Weights become ``bits``-bit integers in blocks of ``block_size`` along the input axis, each block with its
    own scale and zero point (asymmetric, as GGUF's Q4_1 is); activations stay float, and ``accuracy_level`` 4
    lets the CPU kernel multiply in int8 (the fast path on AVX2 / AVX-512 VNNI). The embedding table stays
    float32: a ``Gather`` reads one row per token, so quantising it saves memory but no time.
    """
    model = onnx.load(str(source))
    _fold_transposed_weights(model)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, bits=bits
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external_data_file(source).exists())
