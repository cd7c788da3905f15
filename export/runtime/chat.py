"""Chat prompts: a model's Jinja chat template rendered as transformers renders it, without transformers.

The generator model renders ``MESSAGES`` with it, and the orchestrator renders the same template to
count a grounded prompt's tokens before it packs passages into the context window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .encoding import InputError

ROLES = ("system", "user", "assistant")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may refer to."""

    template: str
    bos_token: str = ""
    eos_token: str = ""

    @cached_property
    def _compiled(self) -> Any:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_exception
        return environment.from_string(self.template)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (each ``{"role", "content"}``); bad messages are an ``InputError``."""
        if not messages:
            raise InputError("messages is empty")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
                raise InputError(f"messages[{index}] must have exactly the keys 'role' and 'content'")
            if message["role"] not in ROLES or not isinstance(message["content"], str):
                raise InputError(f"messages[{index}]: role must be one of {ROLES} and content a string")
        try:
            text: str = self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise InputError(f"the model's chat template refused these messages: {exc}") from exc
        return text
