"""Weights on block grids (GGUF's Q4_1 and Q8_0) packed as 4-bit blocks: the same products, fewer bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tritonrag.export.packed_weights import BLOCK, BlockGrid, write_packed_graph

RNG = np.random.default_rng(7)
INPUTS = 2 * BLOCK


def q4_1(columns: int) -> npt.NDArray[np.float32]:
    """``[INPUTS, columns]`` weights as GGUF's Q4_1 stores them: ``low + step * k``, k in 0..15, per block."""
    blocks = INPUTS // BLOCK
    low = RNG.normal(-0.1, 0.02, (columns, blocks, 1))
    step = RNG.uniform(0.005, 0.02, (columns, blocks, 1))
    levels = RNG.integers(0, 16, (columns, blocks, BLOCK))
    return (low + step * levels).astype(np.float32).reshape(columns, INPUTS).T.copy()


def q8_0(columns: int) -> npt.NDArray[np.float32]:
    """As GGUF's Q8_0: ``d * q``, q in -127..127, per block; some blocks only even levels (gaps of 2 steps)."""
    blocks = INPUTS // BLOCK
    scale = RNG.uniform(0.001, 0.003, (columns, blocks, 1)).astype(np.float32)
    levels = RNG.integers(-127, 128, (columns, blocks, BLOCK))
    levels[: columns // 2] = levels[: columns // 2] // 2 * 2
    return (scale * levels).astype(np.float32).reshape(columns, INPUTS).T.copy()


def graph_file(folder: Path, weights: dict[str, npt.NDArray[np.float32]]) -> Path:
    """``x [batch, sequence, INPUTS]`` times each weight, one output each; the first weight also transposed
    (read elsewhere, as a tied embedding is)."""
    first = next(iter(weights))
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"]) for name in weights]
    nodes.append(helper.make_node("Transpose", [first], ["transposed"]))
    outputs = [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, None) for n in weights]
    outputs.append(helper.make_tensor_value_info("transposed", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", INPUTS])],
        outputs,
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def run(path: Path, x: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, {"x": x})]


@pytest.mark.parametrize("rows", [1, 3])
def test_packed_matmuls_give_the_float32_products(tmp_path: Path, rows: int) -> None:
    weights = {"q4": q4_1(40), "q8": q8_0(24), "float": RNG.normal(0, 0.05, (INPUTS, 8)).astype(np.float32)}
    source = graph_file(tmp_path, weights)
    target = tmp_path / "packed" / "model.onnx"
    target.parent.mkdir()

    assert write_packed_graph(source, target).__dict__ == {"packed": 2, "matmuls": 3}
    nodes = [n.op_type for n in onnx.load(str(target)).graph.node]
    # Q4_1: one 4-bit digit; Q8_0: two. The block sums of x once for both; the off-grid weight stays float32.
    assert nodes.count("MatMulNBits") == 3 and nodes.count("ReduceSum") == 1
    assert nodes.count("MatMul") == 1 + 2  # the float32 weight, and each packed weight's offsets
    x = RNG.normal(0, 1, (rows, 5, INPUTS)).astype(np.float32)
    for expected, got in zip(run(source, x), run(target, x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(run(target, x)[-1], weights["q4"].T)  # still read by the Transpose: kept


def test_grids_are_found_block_by_block_or_not_at_all() -> None:
    weight = q4_1(16)
    grid = BlockGrid.find(weight)
    assert grid is not None and grid.digits == 1 and int(grid.levels.max()) <= 15
    rebuilt = grid.low[..., None] + grid.step[..., None] * grid.levels
    np.testing.assert_allclose(rebuilt.reshape(16, INPUTS).T, weight, rtol=0, atol=1e-7)
    wide = BlockGrid.find(q8_0(16))
    assert wide is not None and wide.digits == 2
    # One block off its grid: the whole weight stays float32.
    weight[3, 5] += 1e-3
    assert BlockGrid.find(weight) is None
    assert BlockGrid.find(RNG.normal(0, 1, (INPUTS, 4)).astype(np.float32)) is None
    assert BlockGrid.find(q4_1(4)[: BLOCK + 1]) is None  # the input axis is no whole number of blocks
