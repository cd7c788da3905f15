"""The text-in Triton models on a real tritonserver, with tiny models exported by the real exporter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from transformers import AutoModelForCausalLM
from tritonclient.utils import InferenceServerException

from tests import reference
from tests.serving import embed, rerank, running_triton, text_input
from tritonrag.deploy.launcher import TritonLaunchError, TritonServer

SENTENCES = [
    "Hi.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, on the Seine.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch of the red barn.",
    "Short one.",
]
PAIRS = [
    ("capital of france", "Paris is the capital of France."),
    ("capital of france", "Bananas are yellow and grow in bunches on tall plants in warm places."),
    ("how do vaccines work", "Vaccines train the immune system."),
    ("how do vaccines work", "The stock market fell."),
]


def test_embedder_equals_pytorch_for_mixed_lengths_in_one_request(
    tiny_client: grpcclient.InferenceServerClient, tiny_sources: dict[str, Path]
) -> None:
    served = embed(tiny_client, SENTENCES)
    expected = reference.embeddings(tiny_sources["embedder"], SENTENCES, max_length=32)
    assert served.shape == expected.shape == (len(SENTENCES), 32)
    assert (served * expected).sum(axis=1).min() >= 0.999


def test_over_long_text_is_truncated_by_default_and_rejected_when_configured(
    tiny_client: grpcclient.InferenceServerClient, tiny_sources: dict[str, Path]
) -> None:
    long_text = " ".join(["word"] * 100)
    served = embed(tiny_client, [long_text])
    expected = reference.embeddings(tiny_sources["embedder"], [long_text], max_length=32)
    assert float(served[0] @ expected[0]) >= 0.999
    with pytest.raises(InferenceServerException, match=r"102 tokens, over the model's limit of 32") as caught:
        embed(tiny_client, [long_text], model="embedder_strict")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_cross_encoder_scores_equal_pytorch(
    tiny_client: grpcclient.InferenceServerClient, tiny_sources: dict[str, Path]
) -> None:
    served = np.concatenate([rerank(tiny_client, q, [p]) for q, p in PAIRS])
    batched = np.concatenate([rerank(tiny_client, PAIRS[0][0], [p for _, p in PAIRS[:2]])])
    expected = reference.cross_encoder_scores(tiny_sources["cross_encoder"], PAIRS, max_length=32)
    assert np.abs(served - expected).max() <= 1e-3
    assert np.abs(batched - expected[:2]).max() <= 1e-3


def test_generative_reranker_scores_equal_pytorch(
    tiny_client: grpcclient.InferenceServerClient, tiny_sources: dict[str, Path], tiny_repository: Path
) -> None:
    version_dir = tiny_repository / "reranker_generative" / "1"
    model = AutoModelForCausalLM.from_pretrained(tiny_sources["generative"])
    scorer = reference.QueryLikelihoodReference(model, version_dir)
    queries, passages = zip(*PAIRS, strict=True)
    # One request with rows of different lengths: padding must not change any row's score.
    inputs = [text_input("QUERY", queries), text_input("PASSAGE", passages)]
    served = tiny_client.infer("reranker_generative", inputs).as_numpy("SCORE").reshape(-1)
    assert np.abs(served - scorer.scores(list(PAIRS))).max() <= 1e-3


def _stats(server: TritonServer, model: str) -> tuple[int, int]:
    url = f"http://{server.endpoints.http_url}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


async def _concurrent_embeddings(url: str, texts: list[str]) -> list[npt.NDArray[np.float32]]:
    client = aioclient.InferenceServerClient(url)
    try:
        results = await asyncio.gather(*(client.infer("embedder", [text_input("TEXT", [t])]) for t in texts))
    finally:
        await client.close()
    return [r.as_numpy("EMBEDDING")[0] for r in results]


def test_concurrent_requests_are_batched_without_changing_results(
    tiny_triton: TritonServer, tiny_client: grpcclient.InferenceServerClient
) -> None:
    texts = [f"{SENTENCES[i % len(SENTENCES)]} (request {i})" for i in range(32)]
    alone = embed(tiny_client, texts)
    # Whether requests meet in the batcher's queue depends on how fast the client sends them: on a loaded
    # machine one round may run each alone, so a few rounds are sent; every round must equal the one-by-one
    # results, and at least one must have been batched.
    rounds = []
    for _ in range(5):
        before = _stats(tiny_triton, "embedder")
        batched = asyncio.run(_concurrent_embeddings(tiny_triton.endpoints.grpc_url, texts))
        inferences, executions = (a - b for a, b in zip(_stats(tiny_triton, "embedder"), before, strict=True))
        assert inferences == 32
        assert np.abs(np.stack(batched) - alone).max() < 1e-5
        rounds.append(executions)
        if executions < inferences:
            break
    assert min(rounds) < 32, f"{rounds} executions for 32 requests a round: nothing was batched"


def _error(call: object) -> InferenceServerException:
    assert callable(call)
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_bad_inputs_get_clear_invalid_argument_errors(tiny_client: grpcclient.InferenceServerClient) -> None:
    empty = _error(lambda: embed(tiny_client, ["fine", "  "]))
    assert empty.status() == "StatusCode.INVALID_ARGUMENT"
    assert "TEXT[1]: text is empty" in empty.message()

    not_utf8 = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    not_utf8.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    assert "TEXT[0] is not valid UTF-8" in _error(lambda: tiny_client.infer("embedder", [not_utf8])).message()

    numbers = grpcclient.InferInput("TEXT", [1, 1], "INT32")
    numbers.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    wrong_type = _error(lambda: tiny_client.infer("embedder", [numbers]))
    assert "TYPE_STRING" in wrong_type.message() or "BYTES" in wrong_type.message()

    one_query = [text_input("QUERY", ["q", "q"]), text_input("PASSAGE", ["p"])]
    assert _error(lambda: tiny_client.infer("reranker", one_query)).status() == "StatusCode.INVALID_ARGUMENT"

    empty_passage = _error(lambda: rerank(tiny_client, "query", [""]))
    assert "passage is empty" in empty_passage.message()


def test_unknown_model_is_named(tiny_client: grpcclient.InferenceServerClient) -> None:
    unknown = _error(lambda: embed(tiny_client, ["x"], model="no_such_model"))
    assert "no_such_model" in unknown.message()


async def _mixed_batch(url: str) -> list[object]:
    client = aioclient.InferenceServerClient(url)
    try:
        calls = [client.infer("embedder", [text_input("TEXT", ["" if i % 4 == 0 else f"text {i}"])]) for i in range(16)]
        results: list[object] = await asyncio.gather(*calls, return_exceptions=True)
        return results
    finally:
        await client.close()


def test_a_bad_request_fails_alone_within_a_batch(tiny_triton: TritonServer) -> None:
    results = asyncio.run(_mixed_batch(tiny_triton.endpoints.grpc_url))
    for i, result in enumerate(results):
        if i % 4 == 0:
            assert isinstance(result, InferenceServerException) and "text is empty" in result.message()
        else:
            assert not isinstance(result, BaseException), result
            assert result.as_numpy("EMBEDDING").shape == (1, 32)  # type: ignore[attr-defined]


def test_a_model_that_fails_to_load_is_named_with_tritons_reason(tiny_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    broken = repository / "embedder" / "1"
    shutil.copytree(tiny_repository / "embedder" / "1", broken)  # model.py, its runtime, tokenizer, metadata
    (broken / "model.onnx").write_bytes(b"this is not an onnx graph")
    (repository / "embedder" / "config.pbtxt").write_bytes((tiny_repository / "embedder" / "config.pbtxt").read_bytes())
    with (
        pytest.raises(TritonLaunchError, match=r"model 'embedder' failed to load: .*(ONNX|onnx|protobuf)"),
        running_triton(repository, ["embedder"], tmp_path / "work"),
    ):
        pass


def test_native_tokenizer_model_serves_the_graph_inputs(tiny_sources: dict[str, Path], tmp_path: Path) -> None:
    """The ``--target native`` tokenizer runs on the Python backend; its ONNX and ensemble parts need the
    full Triton container (the pip-installed server has no onnxruntime backend), so those are checked as configs."""
    from tritonrag.export.exporter import export_model
    from tritonrag.export.runtime.encoding import ModelTokenizer

    native = tmp_path / "native"
    result = export_model(
        f"path:{tiny_sources['embedder']}", "embedder", tmp_path / "repo", target="native", native_repository=native
    )
    texts = ["short", "a somewhat longer sentence for padding"]
    with running_triton(native, ["embedder_tokenizer"], tmp_path / "work") as server:
        client = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
        reply = client.infer("embedder_tokenizer", [text_input("TEXT", texts)])
        empty = _error(lambda: client.infer("embedder_tokenizer", [text_input("TEXT", [""])]))
    expected = ModelTokenizer.from_version_dir(result.version_dir)
    arrays = expected.pad([expected.encode_text(t) for t in texts])
    for name, array in arrays.items():
        assert (reply.as_numpy(name) == array).all(), name
    assert "text is empty" in empty.message()


def _thread_nice_values(server: TritonServer, model: str) -> list[int]:
    """The nice value of every thread of ``model``'s Python-backend stub processes (children of Triton)."""
    assert server.pid is not None
    values = []
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone
        if parent != server.pid or f"/{model}/" not in command:
            continue
        for task in (proc / "task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended
                values.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return values


def test_bulk_requests_run_on_a_lower_priority_thread_with_the_same_results(
    tiny_triton: TritonServer, tiny_client: grpcclient.InferenceServerClient
) -> None:
    interactive = embed(tiny_client, SENTENCES)
    bulk = [
        tiny_client.infer("embedder", [text_input("TEXT", SENTENCES)], parameters={"tritonrag_bulk": True})
        for _ in range(3)
    ]
    for result in bulk:
        np.testing.assert_array_equal(result.as_numpy("EMBEDDING"), interactive)
    # The config's bulk_nice (10) on the threads that ran them (this session's other tests may have started some
    # before); every other thread as Triton started it.
    assert set(_thread_nice_values(tiny_triton, "embedder")) == {0, 10}
