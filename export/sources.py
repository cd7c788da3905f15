"""Model sources: ``hf:<id>``, ``pypi:<package>`` and ``path:<dir>``, resolved to local files and loaded.

Every source resolves to a local folder holding either a Hugging Face model (``config.json`` plus
tokenizer files) or exactly one GGUF file, which transformers dequantises to float32 on load.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from .errors import SourceError

SCHEMES = ("hf", "pypi", "path")
# What an `hf:` export downloads: configs, tokenizer files and weights, not other formats (ONNX, OpenVINO, GGUF).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors", "pytorch_model.bin"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """A model source resolved to local files: a Hugging Face model folder, or a folder and its GGUF file."""

    spec: str
    folder: Path
    gguf_file: str | None = None

    def _kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def load_config(self) -> PretrainedConfig:
        """The model's transformers config."""
        try:
            config: PretrainedConfig = AutoConfig.from_pretrained(self.folder, **self._kwargs())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.spec}: cannot read the model config in {self.folder}: {exc}") from exc
        return config

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        """The model's fast tokenizer (a slow one is converted; one that cannot be is an error)."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
                self.folder, use_fast=True, **self._kwargs()
            )
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.spec}: cannot load the tokenizer in {self.folder}: {exc}") from exc
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise SourceError(f"{self.spec}: the tokenizer has no fast (tokenizers) version, which serving needs")
        return tokenizer

    def load_model(self, auto_class: Any) -> PreTrainedModel:
        """The model in float32, eval mode, eager attention, through ``auto_class`` (an ``AutoModel*``)."""
        try:
            model: PreTrainedModel = auto_class.from_pretrained(
                self.folder, dtype=torch.float32, attn_implementation="eager", **self._kwargs()
            )
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.spec}: cannot load the model weights in {self.folder}: {exc}") from exc
        model.eval()  # type: ignore[no-untyped-call]
        return model


def resolve_source(spec: str) -> ModelSource:
    """Resolve ``hf:<id>``, ``pypi:<package>`` or ``path:<dir>`` to local model files.

    ``hf:`` downloads into the Hugging Face cache (offline, only what is cached already loads);
    ``pypi:`` finds the files inside an installed package without importing it.
    """
    scheme, sep, value = spec.partition(":")
    if not sep or scheme not in SCHEMES or not value:
        raise SourceError(f"bad model source {spec!r}: expected one of " + ", ".join(f"{s}:<...>" for s in SCHEMES))
    if scheme == "hf":
        return _locate(spec, _download(spec, value), search=False)
    if scheme == "pypi":
        return _locate(spec, _package_folder(spec, value), search=True)
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise SourceError(f"{spec}: {folder} is not a directory")
    return _locate(spec, folder, search=False)


def _download(spec: str, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(
            f"{spec}: cannot get model {repo_id!r} from the Hugging Face hub, nor from the local cache "
            f"(offline, or no network, or no such model): {type(exc).__name__}: {exc}"
        ) from exc


def _package_folder(spec: str, package: str) -> Path:
    module = package.replace("-", "_").lower()
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"{spec}: no installed package provides the module {module!r} (pip install {package})")
    return Path(next(iter(found.submodule_search_locations)))


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _locate(spec: str, root: Path, search: bool) -> ModelSource:
    """The one model in ``root`` (and, with ``search``, in its subfolders): an HF folder or a GGUF file."""
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())] if search else [root]
    found = [ModelSource(spec, folder) for folder in folders if _is_model_folder(folder)]
    found += [ModelSource(spec, gguf.parent, gguf.name) for folder in folders for gguf in sorted(folder.glob("*.gguf"))]
    if len(found) != 1:
        what = ", ".join(str(s.folder / (s.gguf_file or "")) for s in found) or "none"
        raise SourceError(
            f"{spec}: expected exactly one model (a folder with config.json and tokenizer files, or one .gguf file) "
            f"in {root}; found {what}"
        )
    return found[0]
