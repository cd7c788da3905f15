"""Launcher pieces that need no running server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tritonrag.deploy.launcher import (
    TritonEndpoints,
    TritonLaunchError,
    TritonServer,
    config_for_device,
    free_ports,
    load_model_config,
    prepare_backends,
)
from tritonrag.server.config import REPO_ROOT

REPOSITORY = REPO_ROOT / "model_repository"


@pytest.mark.parametrize("model", ["embedder", "reranker"])
def test_tracked_configs_parse_and_batch_dynamically(model: str) -> None:
    config = load_model_config(REPOSITORY, model)
    assert config.backend == "python"
    assert config.max_batch_size >= 32
    assert config.HasField("dynamic_batching")
    assert config.version_policy.HasField("latest")
    assert {p for p in config.parameters} >= {"truncate", "max_batch_tokens", "intra_op_threads"}


@pytest.mark.parametrize(("gpu", "kind"), [(True, "KIND_GPU"), (False, "KIND_CPU")])
def test_instance_kind_follows_the_device(gpu: bool, kind: str) -> None:
    as_json = config_for_device(load_model_config(REPOSITORY, "embedder"), gpu)
    assert [g["kind"] for g in as_json["instance_group"]] == [kind]
    assert as_json["input"][0]["name"] == "TEXT"


def test_missing_config_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(TritonLaunchError, match=r"model 'nope' has no .*config\.pbtxt"):
        load_model_config(tmp_path, "nope")


def test_broken_config_names_the_model(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.pbtxt").write_text("max_batch_size: [")
    with pytest.raises(TritonLaunchError, match=r"model 'bad'.*does not parse"):
        load_model_config(tmp_path, "bad")


def test_backend_dir_links_the_stub_for_this_python(tmp_path: Path) -> None:
    backends = prepare_backends(tmp_path)
    python_dir = backends / "python"
    assert (python_dir / "triton_python_backend_stub").resolve().is_file()
    assert (python_dir / "libtriton_python.so").resolve().is_file()
    assert prepare_backends(tmp_path) == backends  # idempotent


def test_a_taken_port_is_named_before_triton_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        http_port, metrics_port = free_ports(2)
        endpoints = TritonEndpoints("127.0.0.1", http_port, taken, metrics_port)
        server = TritonServer(REPOSITORY, endpoints, ["embedder"], tmp_path)
        with pytest.raises(TritonLaunchError, match=f"gRPC port {taken} on 127.0.0.1 is already in use"):
            server.start(timeout_s=10)
        assert server.poll() is None and server.pid is None


def test_missing_repository_is_named(tmp_path: Path) -> None:
    endpoints = TritonEndpoints.on_free_ports()
    with pytest.raises(TritonLaunchError, match="does not exist"):
        TritonServer(tmp_path / "absent", endpoints, ["embedder"], tmp_path).start(timeout_s=10)


def test_ports_picked_together_are_distinct() -> None:
    # Picked one at a time, the kernel may hand back the port it just released.
    assert len(set(free_ports(64))) == 64
    endpoints = TritonEndpoints.on_free_ports()
    assert len({endpoints.http_port, endpoints.grpc_port, endpoints.metrics_port}) == 3
