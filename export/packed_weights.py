"""The generator's weights packed as 4-bit blocks, exactly, where they already lie on a block grid.

A generator dequantised from a GGUF file (the bundled SmolLM2: Q4_1 layers, a Q8_0 embedding) holds float32
weights that, in every block of 32 along the input axis, take at most 16 (Q4_0, Q4_1) or 256 (Q8_0) evenly
spaced values: ``w = low + step * k``. Such a block is stored here as ``MatMulNBits`` 4-bit digits of ``k``
with the scale ``step`` (one digit, or two for up to 256 levels) plus its offset, ``low`` and the digits'
default zero point, times the block's sum of the activations:

    x @ W = MatMulNBits(x; k, step) + blocksum(x) @ offsets

which is the float32 product, regrouped (greedy output identical; logits within float32 rounding), from a
quarter of the bytes. It is written by hand because no library does it: ONNX Runtime's quantiser re-derives
each block's scale and integer zero point from its range, which cannot land on a grid whose minimum is not a
multiple of its step (the int4 export's loss), and its float zero points run on a kernel several times slower
than float32.

ONNX Runtime's CPU kernel for one row of activations (``accuracy_level`` 0: float32 arithmetic) is a
fast matrix-vector product; for several rows it unpacks the blocks and is slower than float32. So the packed
graph is written beside the float32 one, and the engine runs it for decode steps of one row only
(docs/BENCHMARKS.md, "Packed weights").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from .convert import external_data_file

BLOCK = 32  # the GGUF block length, along the input axis
_DIGIT_LEVELS = 16
_DEFAULT_ZERO_POINT = 8  # MatMulNBits' zero point when none is given: a digit d stands for (d - 8) * scale
# How far a weight may lie from its block's grid: float32 rounding of ``low + step * k``.
_RELATIVE_TOLERANCE = 1e-6
_GAP_MULTIPLES = 8  # a block's smallest gap between values may be this many grid steps


@dataclass(frozen=True)
class BlockGrid:
    """A weight ``[K, N]`` as ``low + step * levels`` per block of ``BLOCK`` along K (``[N, K / BLOCK]``)."""

    levels: npt.NDArray[np.int64]  # [N, K / BLOCK, BLOCK], 0 .. 255
    step: npt.NDArray[np.float64]  # [N, K / BLOCK]
    low: npt.NDArray[np.float64]  # [N, K / BLOCK]

    @classmethod
    def find(cls, weight: npt.NDArray[np.float32]) -> BlockGrid | None:
        """The grid ``weight`` lies on, block by block, or None where any block lies on none of 256 levels."""
        rows, columns = weight.shape
        if rows % BLOCK:
            return None
        blocks = weight.T.reshape(columns, rows // BLOCK, BLOCK).astype(np.float64)
        low, span = blocks.min(-1), np.ptp(blocks, axis=-1)
        gaps = np.diff(np.sort(blocks, axis=-1), axis=-1)
        gaps = np.where(gaps > span[..., None] * 1e-3, gaps, np.inf).min(-1)
        gap = np.where(np.isfinite(gaps), gaps, np.where(span > 0, span, 1.0))  # one value: any step
        tolerance = _RELATIVE_TOLERANCE * np.maximum(np.abs(blocks).max(-1), np.finfo(np.float32).tiny)
        step, levels = np.ones_like(gap), np.zeros(blocks.shape, np.int64)
        found = np.zeros(gap.shape, bool)
        for multiple in range(1, _GAP_MULTIPLES + 1):
            count = np.rint(span / (gap / multiple))
            trial = np.where(count > 0, span / np.maximum(count, 1), gap)
            index = np.rint((blocks - low[..., None]) / trial[..., None])
            error = np.abs(low[..., None] + index * trial[..., None] - blocks).max(-1)
            fits = ~found & (count < _DIGIT_LEVELS**2) & (error <= tolerance)
            step = np.where(fits, trial, step)
            levels = np.where(fits[..., None], index.astype(np.int64), levels)
            found |= fits
            if found.all():
                break
        return cls(levels, step, low) if found.all() else None

    @property
    def digits(self) -> int:
        """4-bit digits a level needs: 1 for up to 16 levels, else 2."""
        return 1 if int(self.levels.max()) < _DIGIT_LEVELS else 2

    def packed(self) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]]:
        """Per digit, most significant first: its MatMulNBits blocks ``[N, K / BLOCK, BLOCK / 2]`` (two
        digits a byte, the first in the low nibble) and scales ``[N * K / BLOCK]``."""
        parts = []
        for place in reversed(range(self.digits)):
            digit = (self.levels // _DIGIT_LEVELS**place % _DIGIT_LEVELS).astype(np.uint8)
            nibbles = (digit[..., 0::2] | (digit[..., 1::2] << 4)).astype(np.uint8)
            scale = (self.step * _DIGIT_LEVELS**place).astype(np.float32).reshape(-1)
            parts.append((nibbles, scale))
        return parts

    def offsets(self) -> npt.NDArray[np.float32]:
        """``[K / BLOCK, N]``: what each block adds per unit of its activations' sum, beyond its digits."""
        zero = sum(_DEFAULT_ZERO_POINT * _DIGIT_LEVELS**place for place in range(self.digits))
        offsets: npt.NDArray[np.float32] = (self.low + zero * self.step).T.astype(np.float32)
        return offsets


@dataclass(frozen=True)
class PackedGraph:
    """What ``write_packed_graph`` packed: MatMuls with a constant weight, and how many of them it packed."""

    packed: int
    matmuls: int


def write_packed_graph(source: Path, target: Path) -> PackedGraph:
    """Write ``source`` to ``target`` with each MatMul whose constant weight lies on a block grid packed (module
    docstring); other MatMuls stay float32. Weights in ``<target>.data``; nothing is written where no weight
    lies on a grid. The block sums take activations ``[batch, sequence, K]``, as a decoder graph's are."""
    model = onnx.load(str(source))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    block_sums: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    packed = matmuls = 0
    for node in graph.node:
        grid = None
        if node.op_type == "MatMul" and node.input[1] in weights:
            matmuls += 1
            grid = BlockGrid.find(numpy_helper.to_array(weights[node.input[1]]))
        if grid is None:
            nodes.append(node)
            continue
        packed += 1
        nodes.extend(_packed_matmul(graph, node, grid, block_sums))
    if not packed:
        return PackedGraph(packed, matmuls)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)  # a weight still read elsewhere (a tied embedding's Gather) stays
    external_data_file(target).unlink(missing_ok=True)  # onnx.save appends to an existing weights file
    onnx.save(model, str(target), save_as_external_data=True, location=external_data_file(target).name)
    external_data_file(target).chmod(0o644)  # onnx writes it readable by its owner alone
    return PackedGraph(packed, matmuls)


def _packed_matmul(
    graph: onnx.GraphProto, node: onnx.NodeProto, grid: BlockGrid, block_sums: dict[str, str]
) -> list[onnx.NodeProto]:
    """The nodes that replace ``node``: a ``MatMulNBits`` per digit, plus the blocks' offsets times the block
    sums of its input (computed once per input tensor, in ``block_sums``)."""
    activations, weight, output = node.input[0], node.input[1], node.output[0]
    blocks, columns = grid.step.shape[1], grid.step.shape[0]
    nodes = []
    if activations not in block_sums:
        shape, axes = f"{activations}/blocks_shape", f"{activations}/blocks_axes"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([0, 0, blocks, BLOCK], np.int64), shape),
                numpy_helper.from_array(np.array([-1], np.int64), axes),
            ]
        )
        nodes += [
            helper.make_node("Reshape", [activations, shape], [f"{activations}/blocks"]),
            helper.make_node("ReduceSum", [f"{activations}/blocks", axes], [f"{activations}/block_sums"], keepdims=0),
        ]
        block_sums[activations] = f"{activations}/block_sums"
    graph.initializer.append(numpy_helper.from_array(grid.offsets(), f"{weight}/offsets"))
    terms = [f"{output}/offsets"]
    nodes.append(helper.make_node("MatMul", [block_sums[activations], f"{weight}/offsets"], terms[:1]))
    for place, (nibbles, scale) in enumerate(grid.packed()):
        names = [f"{weight}/digits{place}", f"{weight}/scales{place}"]
        graph.initializer.extend([numpy_helper.from_array(nibbles, names[0]), numpy_helper.from_array(scale, names[1])])
        terms.append(f"{output}/digits{place}")
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [activations, *names],
                [terms[-1]],
                domain="com.microsoft",
                K=blocks * BLOCK,
                N=columns,
                bits=4,
                block_size=BLOCK,
                accuracy_level=0,
            )
        )
    sums = terms[0]
    for index, term in enumerate(terms[1:]):
        total = output if index == len(terms) - 2 else f"{output}/sum{index}"
        nodes.append(helper.make_node("Add", [sums, term], [total]))
        sums = total
    return nodes
