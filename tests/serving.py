"""Client helpers for tests that talk to a real Triton server."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient

from tritonrag.deploy.launcher import TritonEndpoints, TritonServer, free_port


def text_input(name: str, texts: Sequence[str]) -> grpcclient.InferInput:
    """A BYTES input of shape [n, 1]."""
    array = np.array([[t.encode()] for t in texts], dtype=object)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def embed(
    client: grpcclient.InferenceServerClient, texts: Sequence[str], model: str = "embedder"
) -> npt.NDArray[np.float32]:
    """Embeddings of ``texts`` in one request."""
    result: npt.NDArray[np.float32] = client.infer(model, [text_input("TEXT", texts)]).as_numpy("EMBEDDING")
    return result


def rerank(
    client: grpcclient.InferenceServerClient, query: str, passages: Sequence[str], model: str = "reranker"
) -> npt.NDArray[np.float32]:
    """One score per passage, in one request."""
    inputs = [text_input("QUERY", [query] * len(passages)), text_input("PASSAGE", passages)]
    result: npt.NDArray[np.float32] = client.infer(model, inputs).as_numpy("SCORE").reshape(-1)
    return result


@contextmanager
def running_triton(repository: Path, models: Sequence[str], work_dir: Path) -> Iterator[TritonServer]:
    """A real tritonserver on free loopback ports, stopped on exit."""
    endpoints = TritonEndpoints("127.0.0.1", free_port(), free_port(), free_port())
    server = TritonServer(repository, endpoints, models, work_dir)
    server.start(timeout_s=300)
    try:
        yield server
    finally:
        server.stop()
