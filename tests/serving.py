"""Client helpers for tests that talk to a real Triton server, an orchestrator or a real Redis."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient

from tritonrag.deploy.launcher import TritonEndpoints, TritonServer, free_port, free_ports


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
    endpoints = TritonEndpoints.on_free_ports()
    server = TritonServer(repository, endpoints, models, work_dir)
    server.start(timeout_s=300)
    try:
        yield server
    finally:
        server.stop()


# The admin key of every orchestrator the tests and benchmarks start (``auth.admin_key``); the SDK and the CLI
# send it from TRITONRAG_API_KEY (set for every test by tests/conftest.py), raw clients send ``ADMIN_HEADERS``.
ADMIN_KEY = "trk_tests-and-benchmarks-admin-key-0000000000"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_KEY}"),)


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``metadata`` to every call of a channel (``grpc.intercept_channel``)."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _with_metadata(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_metadata(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_metadata(details), request)


@dataclass
class Orchestrator:
    """A ``tritonrag serve`` subprocess and where it listens."""

    process: subprocess.Popen[bytes]
    http_url: str
    grpc_url: str
    data_dir: Path


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key: (cert.pem, key.pem) in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(names, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private = serialization.PrivateFormat.PKCS8
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, private, serialization.NoEncryption()))
    return cert_file, key_file


def orchestrator_env(triton: TritonServer, repository: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for ``tritonrag serve`` against ``triton`` on free loopback ports, accepting ``ADMIN_KEY``."""
    env = dict(os.environ)
    http_port, grpc_port = free_ports(2)
    env.update(
        {
            "TRITONRAG_TRITON__REPOSITORY": str(repository),
            "TRITONRAG_TRITON__GRPC_PORT": str(triton.endpoints.grpc_port),
            "TRITONRAG_DATA_DIR": str(data_dir),
            "TRITONRAG_API__HTTP_PORT": str(http_port),
            "TRITONRAG_API__GRPC_PORT": str(grpc_port),
            "TRITONRAG_AUTH__ADMIN_KEY": ADMIN_KEY,
            **extra,
        }
    )
    return env


def start_orchestrator(env: dict[str, str], timeout_s: float = 60.0, log: IO[bytes] | None = None) -> Orchestrator:
    """Start ``tritonrag serve`` with ``env`` (its stdout and stderr into ``log`` when given) and wait until
    ``/readyz`` answers 200."""
    certificate = env.get("TRITONRAG_API__TLS_CERT_FILE")
    scheme = "https" if certificate else "http"
    http_url = f"{scheme}://127.0.0.1:{env['TRITONRAG_API__HTTP_PORT']}"
    context = ssl.create_default_context(cafile=certificate) if certificate else None
    command = [sys.executable, "-m", "tritonrag.deploy.cli", "serve"]
    if log is None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    else:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tritonrag serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{http_url}/readyz", timeout=2, context=context) as response:
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
