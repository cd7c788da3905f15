"""Client helpers for tests that talk to a real Triton server, an orchestrator or a real Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class Orchestrator:
    """A ``tritonrag serve`` subprocess and where it listens."""

    process: subprocess.Popen[bytes]
    http_url: str
    grpc_url: str
    data_dir: Path


def orchestrator_env(triton: TritonServer, repository: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for ``tritonrag serve`` against ``triton`` on free loopback ports."""
    env = dict(os.environ)
    env.update(
        {
            "TRITONRAG_TRITON__REPOSITORY": str(repository),
            "TRITONRAG_TRITON__GRPC_PORT": str(triton.endpoints.grpc_port),
            "TRITONRAG_DATA_DIR": str(data_dir),
            "TRITONRAG_API__HTTP_PORT": str(free_port()),
            "TRITONRAG_API__GRPC_PORT": str(free_port()),
            **extra,
        }
    )
    return env


def start_orchestrator(env: dict[str, str], timeout_s: float = 60.0) -> Orchestrator:
    """Start ``tritonrag serve`` with ``env`` and wait until ``/readyz`` answers 200."""
    http_url = f"http://127.0.0.1:{env['TRITONRAG_API__HTTP_PORT']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tritonrag.deploy.cli", "serve"], env=env, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tritonrag serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{http_url}/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("tritonrag serve did not become ready in time")
        time.sleep(0.2)
    return Orchestrator(
        process, http_url, f"127.0.0.1:{env['TRITONRAG_API__GRPC_PORT']}", Path(env["TRITONRAG_DATA_DIR"])
    )


def stop_orchestrator(orchestrator: Orchestrator) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 20 s."""
    if orchestrator.process.poll() is None:
        orchestrator.process.terminate()
        try:
            orchestrator.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            orchestrator.process.kill()
            orchestrator.process.wait()


class RedisServer:
    """A ``redis-server`` without persistence on a loopback port, in a directory of its own; restartable."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        executable = shutil.which("redis-server")
        assert executable, "redis-server is missing: deploy/install-system-deps.sh installs it (make install)"
        command = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen([*command, "--dir", str(self._directory)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        """Terminate it; ``start`` brings it back on the same port, empty."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
