"""Load shedding: a burst over a route class's limit is refused at once with Retry-After (429, or gRPC
RESOURCE_EXHAUSTED with retry-after metadata); the requests admitted run to their end. A tenant at its own
limit of answers in flight is refused while another is admitted."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator
from contextlib import ExitStack

import grpc
import httpx2
import pytest

from tests.fakes import FakeServices, open_guard
from tests.harness import serving, wait_until
from tritonrag.clients.http_client import TritonRagClient
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn, DoneEvent, QueryEvent, QueryRequest
from tritonrag.deploy.launcher import free_port
from tritonrag.server.api.admission import Admission, RouteClass
from tritonrag.server.api.grpc_service import RETRY_AFTER_METADATA, create_grpc_server
from tritonrag.server.config import ApiSettings, LimitsSettings, TelemetrySettings
from tritonrag.server.errors import ResourceExhaustedError
from tritonrag.server.security.principal import Principal, open_principal

LIMITS = LimitsSettings(answer=2, search=5, retry_after_s=3)


def counts(admission: Admission) -> dict[tuple[str, str], float]:
    """``(series, class) -> value`` of the admission's own metrics ("" for a series without a class)."""
    return {
        (sample.name, sample.labels.get("class", "")): sample.value
        for family in admission.collect()
        for sample in family.samples
    }


def test_a_burst_over_the_limit_is_refused_and_the_admitted_complete() -> None:
    fakes, admission = FakeServices.create(), Admission(LIMITS)
    fakes.answers.stream = "busy"  # each answer streams until ``stream`` changes
    request = QueryRequest(collection="docs", query="q")
    streamed: list[list[QueryEvent]] = []

    def stream_answer(url: str) -> None:
        with TritonRagClient(url) as sdk:
            streamed.append(list(sdk.query_stream(request)))

    with serving(fakes.http_app(ApiSettings(), admission)) as url:
        with TritonRagClient(url) as sdk:
            sdk.create_collection(CollectionCreate(name="docs"))
            sdk.upsert("docs", [DocumentIn(id="a", text="alpha")])
        admitted = [threading.Thread(target=stream_answer, args=(url,)) for _ in range(2)]
        for thread in admitted:
            thread.start()
        wait_until(lambda: fakes.answers.streams_started == 2, "two answers in flight")

        body = request.model_dump(mode="json")
        refused = [httpx2.post(f"{url}/v1/query", json=body) for _ in range(3)]
        assert [(r.status_code, r.headers.get("retry-after")) for r in refused] == [(429, "3")] * 3
        assert refused[0].json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert "limits.answer" in refused[0].json()["error"]["message"]
        chat = httpx2.post(
            f"{url}/v1/chat/completions", json={"model": "generator", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert (chat.status_code, chat.headers.get("retry-after")) == (429, "3")
        assert chat.json()["error"]["type"] == "rate_limit_error"
        # Another class is not held up by this one.
        assert httpx2.post(f"{url}/v1/search", json={"collection": "docs", "query": "q"}).status_code == 200
        assert counts(admission)[("tritonrag_inflight_requests", "answer")] == 2

        fakes.answers.stream = "finite"  # the admitted answers may end
        for thread in admitted:
            thread.join(timeout=10)
        assert [isinstance(events[-1], DoneEvent) for events in streamed] == [True, True]
        assert fakes.answers.streams_started == 2  # the refused never reached the service
        wait_until(lambda: counts(admission)[("tritonrag_inflight_requests", "answer")] == 0, "the places freed")
        assert httpx2.post(f"{url}/v1/query", json=body).status_code == 200

    metrics = counts(admission)
    assert metrics[("tritonrag_shed_requests_total", "answer")] == 4
    assert metrics[("tritonrag_shed_requests_total", "search")] == 0
    assert (metrics[("tritonrag_inflight_limit", "answer")], metrics[("tritonrag_inflight_limit", "ingest")]) == (2, 8)


@pytest.fixture
async def grpc_server(fakes: FakeServices, admission: Admission) -> AsyncIterator[pb_grpc.TritonRagAsyncStub]:
    settings = ApiSettings(grpc_port=free_port())
    server = create_grpc_server(
        fakes.collections,
        fakes.search,
        fakes.answers,
        settings,
        admission,
        TelemetrySettings(access_log=False),
        open_guard(),
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"{settings.host}:{settings.grpc_port}") as channel:
        yield pb_grpc.TritonRagStub(channel)
    await server.stop(grace=None)


@pytest.fixture
def admission() -> Admission:
    return Admission(LIMITS)


@pytest.mark.anyio
async def test_grpc_refuses_over_the_limit_with_retry_after_metadata(
    fakes: FakeServices, admission: Admission, grpc_server: pb_grpc.TritonRagAsyncStub
) -> None:
    await fakes.collections.create_collection(CollectionCreate(name="docs"))
    fakes.answers.stream = "busy"
    streams = [grpc_server.QueryStream(pb.QueryRequest(collection="docs", query="q")) for _ in range(2)]
    for stream in streams:
        first = await stream.read()
        assert isinstance(first, pb.QueryEvent) and first.WhichOneof("event") == "sources"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await grpc_server.Query(pb.QueryRequest(collection="docs", query="q"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (RETRY_AFTER_METADATA, "3") in tuple(refused.value.trailing_metadata() or ())
    fakes.answers.stream = "finite"
    for stream in streams:
        last = None
        while (event := await stream.read()) is not grpc.aio.EOF:
            last = event
        assert isinstance(last, pb.QueryEvent) and last.WhichOneof("event") == "done"
    assert counts(admission)[("tritonrag_shed_requests_total", "answer")] == 1
    assert counts(admission)[("tritonrag_inflight_requests", "answer")] == 0


def enter_answer(stack: ExitStack, admission: Admission, tenant: str) -> None:
    """Hold an answer place in ``stack`` as a caller of ``tenant``, whose principal stays out of this context."""

    def enter() -> None:
        open_principal(Principal(tenant, frozenset(), f"key:{tenant}"))  # scopes: not the point here
        stack.enter_context(admission.slot(RouteClass.answer))

    contextvars.copy_context().run(enter)


def test_a_tenant_at_its_answer_limit_is_refused_while_another_is_admitted() -> None:
    admission = Admission(LimitsSettings(answer=3, answer_per_tenant=2, retry_after_s=4))
    with ExitStack() as first:
        enter_answer(first, admission, "acme")
        with ExitStack() as second:
            enter_answer(second, admission, "acme")
            with pytest.raises(ResourceExhaustedError) as refused:
                enter_answer(ExitStack(), admission, "acme")
            assert refused.value.message == (
                "2 answer requests of tenant 'acme' are in flight, the limit (limits.answer_per_tenant); retry later"
            )
            assert refused.value.retry_after_s == 4
            with ExitStack() as other:
                enter_answer(other, admission, "globex")
                # The class's own limit still holds over all tenants.
                with pytest.raises(ResourceExhaustedError, match=r"limits\.answer\)"):
                    enter_answer(ExitStack(), admission, "initech")
            with admission.slot(RouteClass.search):  # another class: no tenant limit
                pass
        enter_answer(first, admission, "acme")  # one of acme's answers ended: a place again

    assert counts(admission)[("tritonrag_tenant_shed_requests_total", "")] == 1
