"""``--target native``: models for the full Triton container, where ONNX Runtime is a Triton backend.

Three models: ``<name>_tokenizer`` (Python backend: text → int64 token tensors), ``<name>_onnx``
(``platform: "onnxruntime_onnx"``) and ``<name>``, an ensemble wiring TEXT (or QUERY, PASSAGE) →
tokenizer → ONNX → EMBEDDING (or SCORE). Each request is padded on its own there, so the ONNX model's
dynamic batcher merges only requests of equal padded length; the Python target has no such limit.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .convert import onnx_files
from .graphs import Task
from .repository import publish, staging_dir, write_runtime, write_text
from .runtime.contract import (
    CONFIG_FILE,
    METADATA_FILE,
    ONNX_FILE,
    RUNTIME_DIR,
    TOKENIZER_FILE,
    EmbedderTensors,
    Parameters,
    RerankerTensors,
)

MAX_BATCH_SIZE = 64
QUEUE_DELAY_MICROSECONDS = 2000
TEXT_INPUTS: dict[Task, tuple[str, ...]] = {
    "embedder": (EmbedderTensors.TEXT,),
    "reranker": (RerankerTensors.QUERY, RerankerTensors.PASSAGE),
}
RESULT_OUTPUTS: dict[Task, str] = {"embedder": EmbedderTensors.EMBEDDING, "reranker": RerankerTensors.SCORE}
# The Python-backend model that turns text into the ONNX graph's inputs: the version's runtime/native_tokenizer.py.
TOKENIZER_RUNTIME = "native_tokenizer"


def _onnx_config(name: str, inputs: Sequence[str], output_name: str, output_dims: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH_SIZE)
    for input_name in inputs:
        config.input.add(name=input_name, data_type=mc.TYPE_INT64, dims=[-1])
    config.output.add(name=output_name, data_type=mc.TYPE_FP32, dims=[output_dims])
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_MICROSECONDS
    config.version_policy.latest.num_versions = 1
    return config


def _tokenizer_config(name: str, task: Task, inputs: Sequence[str]) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=MAX_BATCH_SIZE)
    for text_input in TEXT_INPUTS[task]:
        config.input.add(name=text_input, data_type=mc.TYPE_STRING, dims=[1])
    for input_name in inputs:
        config.output.add(name=input_name, data_type=mc.TYPE_INT64, dims=[-1])
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_MICROSECONDS
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.version_policy.latest.num_versions = 1
    config.parameters[Parameters.TRUNCATE].string_value = "true"
    return config


def _ensemble_config(name: str, task: Task, inputs: Sequence[str], output_name: str, dims: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=MAX_BATCH_SIZE)
    for text_input in TEXT_INPUTS[task]:
        config.input.add(name=text_input, data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name=RESULT_OUTPUTS[task], data_type=mc.TYPE_FP32, dims=[dims])
    tokenize = config.ensemble_scheduling.step.add(model_name=f"{name}_tokenizer", model_version=-1)
    run = config.ensemble_scheduling.step.add(model_name=f"{name}_onnx", model_version=-1)
    for text_input in TEXT_INPUTS[task]:
        tokenize.input_map[text_input] = text_input
    for input_name in inputs:
        tokenize.output_map[input_name] = input_name
        run.input_map[input_name] = input_name
    run.output_map[output_name] = RESULT_OUTPUTS[task]
    return config


def _write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    write_text(model_dir / CONFIG_FILE, text_format.MessageToString(config))


def _publish_files(model_dir: Path, files: Sequence[Path], runtime: Path | None = None) -> Path:
    """A new version of ``model_dir`` with ``files``, and with ``runtime``'s copy serving the tokenizer if given."""
    with staging_dir(model_dir) as staging:
        for file in files:
            shutil.copy2(file, staging / file.name)
        if runtime is not None:
            write_runtime(staging, TOKENIZER_RUNTIME, runtime)
        return publish(staging, model_dir)[1]


def write_native(
    repository: Path,
    name: str,
    task: Task,
    version_dir: Path,
    inputs: Sequence[str],
    output_name: str,
    output_dims: int,
) -> list[Path]:
    """Write the three native models for the export in ``version_dir``; returns their version directories."""
    onnx_version = _publish_files(repository / f"{name}_onnx", onnx_files(version_dir / ONNX_FILE))
    tokenizer_version = _publish_files(
        repository / f"{name}_tokenizer",
        [version_dir / TOKENIZER_FILE, version_dir / METADATA_FILE],
        version_dir / RUNTIME_DIR,
    )
    ensemble_version = repository / name / "1"  # an ensemble has no files, but Triton wants a version directory
    ensemble_version.mkdir(parents=True, exist_ok=True)
    _write_config(repository / f"{name}_onnx", _onnx_config(f"{name}_onnx", inputs, output_name, output_dims))
    _write_config(repository / f"{name}_tokenizer", _tokenizer_config(f"{name}_tokenizer", task, inputs))
    _write_config(repository / name, _ensemble_config(name, task, inputs, output_name, output_dims))
    return [onnx_version, tokenizer_version, ensemble_version]
