"""Client helpers for tests that talk to a real Triton server, an orchestrator, a real Redis or PostgreSQL."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import numpy.typing as npt
import psycopg
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


def wait_until(
    ready: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes] | None,
    timeout_s: float = 10.0,
    poll_s: float = 0.02,
) -> None:
    """Poll ``ready`` every ``poll_s`` until it holds; AssertionError when ``process`` (what brings ``what`` about,
    if any) exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process is None or process.poll() is None, f"waiting for {what}: exited with {process.returncode}"
        assert time.monotonic() < deadline, f"waiting for {what}: not within {timeout_s:g} s"
        time.sleep(poll_s)


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


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
        wait_until(lambda: accepts(self.port), "redis-server", self._process)

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


POSTGRES_USER = "tritonrag"  # initdb's superuser of every PostgresServer, with trust authentication


def postgres_bindir() -> Path:
    """The folder of PostgreSQL's ``initdb`` and ``postgres``: Debian's newest, else ``pg_config --bindir``."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3].split(".")[0]))
    if debian:
        return debian[-1].parent
    if pg_config := shutil.which("pg_config"):
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(bindir) / "initdb").is_file():
            return Path(bindir)
    initdb = shutil.which("initdb")
    assert initdb, "PostgreSQL (initdb, postgres) is missing: deploy/install-system-deps.sh installs it (make install)"
    return Path(initdb).parent


class PostgresServer:
    """A PostgreSQL server of its own on a loopback port, with trust authentication for ``POSTGRES_USER``, the
    database ``tritonrag`` and fsync on; restartable on the same data, also after ``kill`` (a crash).

    Its data and Unix socket live in a folder of its own under /tmp (short enough for a socket's path), which
    ``close`` (and ``with``) removes; its log is ``directory/postgres.log``. initdb and postgres refuse to run as
    root: as root they run as the ``postgres`` system user (``nobody`` where there is none), which owns that folder.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = self.url_of("tritonrag")
        self.log = directory / "postgres.log"
        self._bindir = postgres_bindir()
        self._home = Path(tempfile.mkdtemp(prefix="tritonrag-postgres-", dir="/tmp"))
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = _unprivileged_user()
            os.chmod(self._home, 0o700)
            os.chown(self._home, user.pw_uid, user.pw_gid)
            self._as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
        self._data = self._home / "data"
        self._process: subprocess.Popen[bytes] | None = None

    def url_of(self, database: str) -> str:
        """The SQLAlchemy URL (psycopg 3) of ``database`` on this server."""
        return f"postgresql+psycopg://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it (after initdb and with an empty ``tritonrag`` database the first time) and wait until it takes
        connections; after a ``kill`` that includes its crash recovery."""
        assert self._process is None, "the PostgreSQL server is running already"
        fresh = not self._data.exists()
        if fresh:
            options = ["--auth=trust", f"--username={POSTGRES_USER}", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
            initdb = [*self._as_user, str(self._bindir / "initdb"), "-D", str(self._data), *options]
            done = subprocess.run(initdb, cwd=self._home, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"initdb failed:\n{done.stdout}{done.stderr}"
        address = ["-k", str(self._home), "-h", "127.0.0.1", "-p", str(self.port)]
        settings = ["fsync=on", "synchronous_commit=on", "max_connections=100"]
        command = [str(self._bindir / "postgres"), "-D", str(self._data), *address]
        command += [argument for setting in settings for argument in ("-c", setting)]
        with self.log.open("ab") as log:
            # A session of its own: ``kill`` takes its backends down with it, as a crash of the machine would.
            process = subprocess.Popen(
                [*self._as_user, *command], cwd=self._home, stdout=log, stderr=log, start_new_session=True
            )
        self._process = process
        wait_until(self._takes_connections, f"postgres (its log: {self.log})", process, timeout_s)
        if fresh:
            self.execute("CREATE DATABASE tritonrag")

    def execute(self, sql: str) -> None:
        """Run ``sql`` in the ``postgres`` database, outside a transaction (CREATE and DROP DATABASE)."""
        with psycopg.connect(**self._connection("postgres"), autocommit=True) as connection:
            connection.execute(sql.encode())

    def create_database(self, name: str) -> str:
        """A new, empty database ``name``: its SQLAlchemy URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing the connections still open to it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Shut it down (fast: open connections are closed); ``start`` brings it back with its data."""
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
            self._process = None

    def kill(self) -> None:
        """SIGKILL it and its backends, as a crash; ``start`` recovers what was committed."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._process = None

    def close(self) -> None:
        """Stop it and remove its data."""
        self.stop()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self, database: str) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": POSTGRES_USER, "dbname": database}

    def _takes_connections(self) -> bool:
        try:
            psycopg.connect(**self._connection("postgres"), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True


def _unprivileged_user() -> pwd.struct_passwd:
    """Who runs PostgreSQL for root: the ``postgres`` system user (Debian's package makes it), else ``nobody``."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")
