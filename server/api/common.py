"""What every front-end shares: the request-id key, closing the services' streams, and validation wording."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio

from ..errors import InvalidArgumentError

_T = TypeVar("_T")


async def aclose_shielded(stream: AsyncGenerator[Any]) -> None:
    """Close one of the services' streams, even from a cancelled handler: the close is shielded, so the
    stream can still await its clean-up (closing the generation, which Triton then cancels)."""
    with anyio.CancelScope(shield=True):
        await stream.aclose()


@asynccontextmanager
async def closing(stream: AsyncGenerator[_T]) -> AsyncIterator[AsyncGenerator[_T]]:
    """``contextlib.aclosing`` for the services' streams, with ``aclose_shielded``: closed however the
    handler ends, the client going away included."""
    try:
        yield stream
    finally:
        await aclose_shielded(stream)


# What one refusal lists: a message stays short (gRPC clients refuse trailers over 16 KiB) however many problems
# a request has, or however long a key it names.
MAX_PROBLEMS = 10
MAX_PROBLEM_CHARS = 300


def invalid_argument(errors: Sequence[Mapping[str, Any]]) -> InvalidArgumentError:
    """One error for a failed validation, worded the same over every front-end.

    ``errors`` are pydantic's (``ValidationError.errors()``). The message lists the problems as
    ``field.path: problem``, sorted, since the order of keys differs between a JSON object and a
    protobuf Struct: the first ``MAX_PROBLEMS``, each cut at ``MAX_PROBLEM_CHARS``, then how many more;
    ``field`` names the first one.
    """
    problems = sorted((".".join(map(str, error["loc"])), _problem(error)) for error in errors)
    listed = [_cut(f"{field}: {problem}" if field else problem) for field, problem in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        listed.append(f"and {len(problems) - MAX_PROBLEMS} more")
    return InvalidArgumentError("; ".join(listed), field=problems[0][0] or None)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else f"{text[: MAX_PROBLEM_CHARS - 1]}…"


def _problem(error: Mapping[str, Any]) -> str:
    """Pydantic's message, without the "Value error, " it puts before our validators' own words."""
    if error["type"] == "value_error" and "ctx" in error:
        return str(error["ctx"]["error"])
    return str(error["msg"])
