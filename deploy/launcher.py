"""Run the ``tritonserver`` binary from the ``nvidia-pytriton`` wheel as a subprocess.

The launcher puts the Python-backend stub built for the running interpreter in place,
starts Triton in explicit model-control mode, loads the requested models (choosing
``KIND_GPU`` instances when a GPU is visible; the versions the roll-out state names,
else those of the model's version policy), forwards Triton's log, and stops it
cleanly. Failures name the cause: a port already taken, or the model that failed to
load with Triton's own reason.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytriton
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tritonrag.export.runtime.contract import CONFIG_FILE

_DIST = Path(pytriton.__file__).resolve().parent / "tritonserver"
_LIBS = _DIST.parent.parent / "nvidia_pytriton.libs"


class TritonLaunchError(RuntimeError):
    """Triton could not be started or a model could not be loaded."""


@dataclass(frozen=True)
class TritonEndpoints:
    """The address and ports one Triton server listens on."""

    address: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @classmethod
    def on_free_ports(cls, address: str = "127.0.0.1") -> TritonEndpoints:
        """Endpoints on three distinct ports that are free on ``address`` right now."""
        http_port, grpc_port, metrics_port = free_ports(3, address)
        return cls(address, http_port, grpc_port, metrics_port)

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"


def gpu_visible() -> bool:
    """True when ``nvidia-smi`` lists at least one GPU that CUDA_VISIBLE_DEVICES does not hide."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU " in out.stdout


def free_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``address`` right now.

    Every socket stays bound until all are picked: the kernel may hand out a port it just
    released again, so ports picked one at a time can collide.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((address, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` right now."""
    return free_ports(1, address)[0]


def check_port_free(address: str, port: int, what: str) -> None:
    """Raise TritonLaunchError naming ``what`` when ``port`` cannot be bound on ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Triton binds: a port left in TIME_WAIT by a stopped server is free to reuse.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise TritonLaunchError(
                f"{what} port {port} on {address} is already in use ({exc.strerror}); "
                f"stop what holds it or choose another port"
            ) from exc


def prepare_backends(work_dir: Path) -> Path:
    """A backend directory whose Python backend runs the stub built for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = _DIST / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonLaunchError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    backends = work_dir / f"backends-py{version}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [*(_DIST / "backends" / "python").glob("*.*"), stub]:
        link = python_dir / source.name
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(source)
    return backends


def _python_env() -> dict[str, str]:
    """Environment under which the stub embeds this interpreter and sees its packages."""
    env = dict(os.environ)
    lib_dirs = [str(_LIBS)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, sysconfig.get_config_var("INSTSONAME") or "").is_file():
        lib_dirs.insert(0, libdir)
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = ":".join(p for p in sys.path if p)
    return env


def load_model_config(repository: Path, model: str) -> model_config_pb2.ModelConfig:
    """Parse ``<repository>/<model>/config.pbtxt``."""
    path = repository / model / CONFIG_FILE
    if not path.is_file():
        raise TritonLaunchError(f"model '{model}' has no {path}")
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except text_format.ParseError as exc:
        raise TritonLaunchError(f"model '{model}': {path} does not parse: {exc}") from exc
    return config


def config_for_device(config: model_config_pb2.ModelConfig, gpu: bool) -> dict[str, Any]:
    """The model config as Triton's JSON, with instance groups on the GPU or the CPU."""
    kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if gpu else model_config_pb2.ModelInstanceGroup.KIND_CPU
    for group in config.instance_group:
        group.kind = kind
    result: dict[str, Any] = json_format.MessageToDict(config, preserving_proto_field_name=True)
    return result


class TritonServer:
    """One ``tritonserver`` subprocess serving ``models`` from ``repository``."""

    def __init__(
        self,
        repository: Path,
        endpoints: TritonEndpoints,
        models: Sequence[str],
        work_dir: Path,
        log_verbose: int = 0,
        log_stream: IO[str] | None = None,
        versions: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``versions``: for a model listed there, exactly those versions are loaded (the roll-out state's), not
        the versions its ``config.pbtxt`` policy picks."""
        self.repository = repository.resolve()
        self.versions = dict(versions or {})
        self.endpoints = endpoints
        self.models = list(models)
        self.work_dir = work_dir
        self.log_verbose = log_verbose
        self._log_stream = log_stream if log_stream is not None else sys.stderr
        self._log_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._process: subprocess.Popen[str] | None = None
        self._log_thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def log_tail(self) -> str:
        """The last lines Triton printed."""
        return "".join(self._log_tail)

    def start(self, timeout_s: float = 300.0) -> None:
        """Start Triton, load every model and wait until all are ready."""
        if not self.repository.is_dir():
            raise TritonLaunchError(f"model repository {self.repository} does not exist")
        ep = self.endpoints
        for what, port in (("HTTP", ep.http_port), ("gRPC", ep.grpc_port), ("metrics", ep.metrics_port)):
            check_port_free(ep.address, port, f"Triton {what}")
        configs = {name: load_model_config(self.repository, name) for name in self.models}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(_DIST / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={prepare_backends(self.work_dir)}",
            f"--cache-directory={_DIST / 'caches'}",
            f"--http-address={ep.address}",
            f"--http-port={ep.http_port}",
            f"--grpc-address={ep.address}",
            f"--grpc-port={ep.grpc_port}",
            f"--metrics-address={ep.address}",
            f"--metrics-port={ep.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=20",
            f"--log-verbose={self.log_verbose}",
        ]
        self._process = subprocess.Popen(
            command,
            env=_python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._log_thread = threading.Thread(target=self._forward_log, name="triton-log", daemon=True)
        self._log_thread.start()
        deadline = time.monotonic() + timeout_s
        try:
            self._wait_for("/v2/health/live", deadline)
            gpu = gpu_visible()
            for name, config in configs.items():
                device_config = config_for_device(config, gpu)
                if self.versions.get(name):
                    device_config["version_policy"] = {"specific": {"versions": [int(v) for v in self.versions[name]]}}
                self._load(name, device_config, deadline)
            self._wait_for("/v2/health/ready", deadline)
        except BaseException:
            self.stop()
            raise

    def _forward_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._log_tail.append(line)
            self._log_stream.write(f"[triton] {line}")
            self._log_stream.flush()

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.endpoints.http_url}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def _wait_for(self, path: str, deadline: float) -> None:
        while True:
            self._raise_if_exited()
            try:
                status, _ = self._request("GET", path, None, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TritonLaunchError(f"Triton did not answer {path} in time\n{self.log_tail()}")
            time.sleep(0.2)

    def _load(self, name: str, config: dict[str, Any], deadline: float) -> None:
        body = {"parameters": {"config": json.dumps(config)}}
        timeout = max(1.0, deadline - time.monotonic())
        status, text = self._request("POST", f"/v2/repository/models/{name}/load", body, timeout=timeout)
        if status != 200:
            try:
                reason = json.loads(text).get("error", text)
            except json.JSONDecodeError:
                reason = text
            raise TritonLaunchError(f"model '{name}' failed to load: {reason}")

    def _raise_if_exited(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise TritonLaunchError(
                f"tritonserver exited with code {self._process.returncode} before it was ready\n{self.log_tail()}"
            )

    def poll(self) -> int | None:
        """Triton's exit code once it has exited, else None."""
        return self._process.poll() if self._process else None

    def wait(self) -> int:
        """Block until Triton exits; return its exit code."""
        assert self._process is not None
        return self._process.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask Triton to shut down (SIGTERM), and kill it if it does not within ``timeout_s``."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
