"""``VersionLoader``: exactly a set of versions of a model loaded on every Triton endpoint, in explicit mode.

Each endpoint is asked to load the model with its current config and ``version_policy: specific`` set
to the versions wanted. Triton keeps serving a version that stays in the set while the others load or
unload (measured: no failed request to version 1 while version 2 loads beside it, nor while a broken
version 3 fails to load), so traffic never depends on a reload; it moves only by the pool's routes,
once every endpoint reports the new version ready.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from tritonrag.export.runtime.contract import CONFIG_FILE

from ..errors import FailedPreconditionError
from ..routing.endpoints import Endpoint
from ..routing.triton_pool import TritonPool


class LoadError(FailedPreconditionError):
    """A version could not be loaded (or unloaded) on every endpoint; the message names the endpoint and Triton's
    reason."""


class VersionLoader:
    """Loads sets of versions on every endpoint of ``pool``; ``repository`` holds each model's ``config.pbtxt``
    (used on an endpoint that does not serve the model at all yet)."""

    def __init__(self, pool: TritonPool, repository: Path, timeout_s: float) -> None:
        self._pool = pool
        self._repository = repository
        self._timeout_s = timeout_s

    async def load(self, model: str, versions: set[str]) -> None:
        """Make exactly ``versions`` of ``model`` loaded on every endpoint and wait until each reports them ready;
        ``LoadError`` naming the first endpoint that refused (the versions that were loaded stay loaded)."""
        if not versions:
            raise ValueError("a model keeps at least one version loaded")
        deadline = time.monotonic() + self._timeout_s
        endpoints = self._pool.endpoints()
        results = await asyncio.gather(
            *(self._load_on(e, model, versions, deadline) for e in endpoints), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        while True:
            await self._pool.probe()
            missing = {
                url: sorted(versions - set(ready), key=int)
                for url, ready in self._pool.ready_versions(model).items()
                if versions - set(ready)
            }
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LoadError(f"'{model}' versions not ready on every endpoint in time: {missing}")
            await asyncio.sleep(0.2)

    async def _load_on(self, endpoint: Endpoint, model: str, versions: set[str], deadline: float) -> None:
        config = await self._config(endpoint, model)
        if _policy_versions(config) == versions and await self._ready(endpoint, model) == versions:
            return  # already so: a load with a config would make Triton load the model again
        config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in versions)}}
        try:
            await endpoint.client.load_model(
                model, config=json.dumps(config), client_timeout=max(1.0, deadline - time.monotonic())
            )
        except InferenceServerException as exc:
            raise LoadError(
                f"{endpoint.url} could not load '{model}' versions {sorted(versions, key=int)}: {exc.message()}"
            ) from exc
        # Triton answers a load that skipped a version (e.g. a directory this server's repository lacks) with OK.
        states = await self._states(endpoint, model)
        for version in sorted(versions, key=int):
            state, reason = states.get(version, ("", ""))
            if state != "READY":
                found = f"is {state}: {reason}" if state else "is not in its repository"
                raise LoadError(f"{endpoint.url} could not load '{model}' version {version}: it {found}")

    @staticmethod
    async def _states(endpoint: Endpoint, model: str) -> dict[str, tuple[str, str]]:
        """Each version of ``model`` in the endpoint's repository index: its state and reason."""
        index = await endpoint.client.get_model_repository_index(client_timeout=10.0)
        return {str(e.version): (e.state, e.reason) for e in index.models if e.name == model}

    async def _ready(self, endpoint: Endpoint, model: str) -> set[str]:
        return {version for version, (state, _) in (await self._states(endpoint, model)).items() if state == "READY"}

    async def _config(self, endpoint: Endpoint, model: str) -> dict[str, Any]:
        """The model's config as the endpoint serves it (device kinds included), else its ``config.pbtxt``."""
        try:
            response = await endpoint.client.get_model_config(model, "", client_timeout=10.0)
        except InferenceServerException:
            path = self._repository / model / CONFIG_FILE
            try:
                parsed = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            except (OSError, text_format.ParseError) as exc:
                raise LoadError(f"'{model}' is not served by {endpoint.url} and {path} is unusable: {exc}") from exc
            config: dict[str, Any] = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
            config["name"] = model
            return config
        served: dict[str, Any] = json_format.MessageToDict(response.config, preserving_proto_field_name=True)
        return served


def _policy_versions(config: dict[str, Any]) -> set[str] | None:
    """The versions a config's ``version_policy: specific`` names (JSON from protobuf writes int64 as strings);
    None for another policy."""
    specific = config.get("version_policy", {}).get("specific")
    return {str(v) for v in specific.get("versions", [])} if isinstance(specific, dict) else None
