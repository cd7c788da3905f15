"""The OpenAI-compatible routes under ``/v1``: chat completions, completions, embeddings and models.

Handlers hand the parsed request and its id to ``serving.OpenAIServing``. Every error is answered in
OpenAI's shape by the router's own route class, so the router needs no application-level handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from tritonrag.clients.wire.auth import Scope

from ...config import ModelSettings
from ..admission import Admission, RouteClass
from ..auth import Guard
from ..cache import CACHE_SCOPE
from ..errors import OpenAIErrorBody, log_unexpected, openai_error
from ..request_id import RequestId
from ..services import Chats, Models
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    OpenAIModel,
    OpenAIModelList,
)
from .serving import OpenAIServing

_RESPONSES: dict[int | str, dict[str, Any]] = {"default": {"model": OpenAIErrorBody, "description": "Error"}}
# A streamed answer, as OpenAPI reads the schema of a text/event-stream (one event): `data:` a chunk's JSON, or [DONE].
_STREAM: dict[str, Any] = {
    "text/event-stream": {
        "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    }
}


def openai_router(chats: Chats, models: Models, names: ModelSettings, admission: Admission, guard: Guard) -> APIRouter:
    """OpenAI's chat completions, completions, embeddings and models under ``/v1`` over ``chats`` and ``models``.

        ``names.generator`` and ``names.embedder`` are the served models these endpoints use; ``admission`` limits
        completions (the answer class) and embeddings (the search class); every route needs the ``read`` scope
    (``guard``). The application must run
        ``request_id.RequestIds``, which gives each request the id handed to the services.
    """
    answer = [guard(Scope.read, RouteClass.answer), admission.dependency(RouteClass.answer)]
    search = [guard(Scope.read, RouteClass.search), admission.dependency(RouteClass.search)]
    read = guard(Scope.read)
    serving = OpenAIServing(chats, models, names)
    router = APIRouter(
        prefix="/v1", route_class=_OpenAIRoute, tags=["openai"], responses=_RESPONSES, dependencies=[CACHE_SCOPE]
    )

    @router.post(
        "/chat/completions",
        responses={
            200: {
                "model": ChatCompletion,
                "description": "With `stream`: server-sent ChatCompletionChunk",
                "content": _STREAM,
            }
        },
        dependencies=answer,
    )
    async def create_chat_completion(body: ChatCompletionRequest, request_id: RequestId) -> Response:
        """OpenAI's chat completion, streamed or not; ``tritonrag`` grounds it on a collection."""
        return _response(await serving.chat_completion(body, request_id))

    @router.post(
        "/completions",
        responses={
            200: {
                "model": Completion,
                "description": "With `stream`: server-sent Completion events",
                "content": _STREAM,
            }
        },
        dependencies=answer,
    )
    async def create_completion(body: CompletionRequest, request_id: RequestId) -> Response:
        """OpenAI's (legacy) completion of one prompt, streamed or not; ``max_tokens`` defaults to 16."""
        return _response(await serving.completion(body, request_id))

    @router.post("/embeddings", dependencies=search)
    async def create_embedding(body: EmbeddingRequest, request_id: RequestId) -> EmbeddingList:
        """Vectors of texts; ``encoding_format`` ``base64`` (the official clients' default) or ``float``."""
        return await serving.embedding(body, request_id)

    @router.get("/models", dependencies=[read])
    async def list_models() -> OpenAIModelList:
        """The models Triton serves."""
        return await serving.model_list()

    @router.get("/models/{model_id:path}", dependencies=[read])  # ids may hold "/": "org/model"
    async def retrieve_model(model_id: str) -> OpenAIModel:
        """One served model; 404 ``model_not_found`` for another name."""
        return await serving.model(model_id)

    return router


def _response(answer: BaseModel | Response) -> Response:
    """A stream as it is; a whole answer as its JSON (the fields it omits when unset, omitted)."""
    return answer if isinstance(answer, Response) else JSONResponse(answer.model_dump(mode="json"))


class _OpenAIRoute(APIRoute):
    """Answers every error of its endpoint in OpenAI's shape, whatever the application's handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                log_unexpected(exc, "an OpenAI-compatible endpoint")
                return openai_error(exc).response()

        return handle
