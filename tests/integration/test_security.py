"""Security of a real orchestrator over tiny Triton models: tenants isolated over HTTP and gRPC, an admin acting
for a tenant, keys made and revoked without a restart, JWTs, ``/metrics`` for admins, and no secret in its logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import jwt
import pytest
from google.protobuf import struct_pb2

from tests.documents import RUSSIAN, UNICODE, text_of
from tests.serving import (
    ADMIN_HEADERS,
    ADMIN_KEY,
    Orchestrator,
    orchestrator_env,
    self_signed_certificate,
    start_orchestrator,
    stop_orchestrator,
)
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.deploy.launcher import TritonServer

JWT_SECRET = "the-jwt-secret-of-the-security-tests-0123456789"
WRONG_KEY = "trk_a-key-that-was-never-made-0000000000000000"


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs") / "orchestrator.log"


@pytest.fixture(scope="module")
def orchestrator(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory, log_path: Path
) -> Iterator[Orchestrator]:
    env = orchestrator_env(
        tiny_triton,
        tiny_repository,
        tmp_path_factory.mktemp("data"),
        TRITONRAG_INGEST__INLINE_MAX_DOCUMENTS="2",
        TRITONRAG_AUTH__JWT__HS256_SECRET=JWT_SECRET,
        TRITONRAG_TELEMETRY__LOG_LEVEL="DEBUG",
    )
    with log_path.open("wb") as log:
        server = start_orchestrator(env, log=log)
        yield server
        stop_orchestrator(server)


@pytest.fixture(scope="module")
def admin(orchestrator: Orchestrator) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=orchestrator.http_url, timeout=60, headers=ADMIN_HEADERS) as client:
        yield client


def key_of(admin: httpx2.Client, tenant: str, *scopes: str) -> str:
    created = admin.post("/v1/keys", json={"tenant": tenant, "scopes": list(scopes), "name": f"{tenant} tests"})
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    return key


@pytest.fixture(scope="module")
def tenants(admin: httpx2.Client, orchestrator: Orchestrator) -> Iterator[dict[str, httpx2.Client]]:
    """A writing client of each tenant, and acme's collection ``private`` with real documents."""
    clients = {
        tenant: httpx2.Client(
            base_url=orchestrator.http_url, timeout=60, headers={"X-API-Key": key_of(admin, tenant, "write")}
        )
        for tenant in ("acme", "globex")
    }
    acme = clients["acme"]
    assert acme.post("/v1/collections", json={"name": "private"}).status_code == 201
    documents = [
        {"id": "json", "text": text_of(json, UNICODE), "metadata": {"title": "json"}},
        {"id": "ru", "text": RUSSIAN, "metadata": {"title": "ru"}},
    ]
    assert acme.post("/v1/collections/private/documents", json={"documents": documents}).status_code == 200
    yield clients
    for client in clients.values():
        client.close()


def test_another_tenants_collection_is_not_found_by_any_route(tenants: dict[str, httpx2.Client]) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    assert [c["name"] for c in acme.get("/v1/collections").json()["collections"]] == ["private"]
    assert globex.get("/v1/collections").json()["collections"] == []
    search = {"collection": "private", "query": "JSON encoder", "mode": "sparse"}
    assert [hit["doc_id"] for hit in acme.post("/v1/search", json=search).json()["hits"]][:1] == ["json"]
    attempts = [
        globex.get("/v1/collections/private"),
        globex.post("/v1/search", json=search),
        globex.post("/v1/query", json=search),
        globex.get("/v1/collections/private/documents/json"),
        globex.delete("/v1/collections/private/documents/json"),
        globex.post(
            "/v1/collections/private/documents:delete",
            json={"filters": {"field": "title", "op": "eq", "value": "json"}},
        ),
        globex.post("/v1/collections/private/documents", json={"documents": [{"id": "x", "text": "overwritten"}]}),
        globex.delete("/v1/collections/private"),
    ]
    for answer in attempts:
        assert answer.status_code == 404, (answer.request.method, answer.request.url.path, answer.text)
        assert answer.json()["error"]["message"] == "collection 'private' does not exist"
    assert acme.get("/v1/collections/private").json()["documents"] == 2  # untouched


def test_two_tenants_may_use_one_name_and_each_sees_its_own(tenants: dict[str, httpx2.Client]) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    assert globex.post("/v1/collections", json={"name": "shared-name"}).status_code == 201
    assert acme.post("/v1/collections", json={"name": "shared-name"}).status_code == 201
    documents = {"acme": "Anvils and rocket skates for coyotes.", "globex": "Nuclear reactors from Cypress Creek."}
    for tenant, text in documents.items():
        body = {"documents": [{"id": "doc", "text": text}]}
        assert tenants[tenant].post("/v1/collections/shared-name/documents", json=body).status_code == 200
    for tenant, text in documents.items():
        found = tenants[tenant].post("/v1/search", json={"collection": "shared-name", "query": "anvils reactors"})
        assert [hit["text"] for hit in found.json()["hits"]] == [text]
        assert found.json()["collection"] == "shared-name"


def test_jobs_belong_to_their_tenant(tenants: dict[str, httpx2.Client]) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    documents = [{"id": f"job-{n}", "text": f"Document {n} of a job. {RUSSIAN}"} for n in range(5)]
    accepted = acme.post("/v1/collections/private/documents", json={"documents": documents})
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    assert globex.get(f"/v1/jobs/{job_id}").status_code == 404
    deadline = time.monotonic() + 60
    while (job := acme.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert (job["collection"], job["status"], job["done"]) == ("private", "succeeded", 5)


def test_grpc_isolates_tenants_as_http_does(orchestrator: Orchestrator, tenants: dict[str, httpx2.Client]) -> None:
    def metadata(client: httpx2.Client) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", client.headers["x-api-key"]),)

    acme, globex = metadata(tenants["acme"]), metadata(tenants["globex"])
    title_is_json = struct_pb2.Struct()
    title_is_json.update({"field": "title", "op": "eq", "value": "json"})
    with grpc.insecure_channel(orchestrator.grpc_url) as channel:
        stub = pb_grpc.TritonRagStub(channel)
        listed = stub.ListCollections(pb.ListCollectionsRequest(), metadata=acme)
        assert "private" in [c.name for c in listed.collections]
        assert "private" not in [
            c.name for c in stub.ListCollections(pb.ListCollectionsRequest(), metadata=globex).collections
        ]
        refused: list[Callable[[], object]] = [
            lambda: stub.GetCollection(pb.GetCollectionRequest(name="private"), metadata=globex),
            lambda: stub.Search(pb.SearchRequest(collection="private", query="JSON"), metadata=globex),
            lambda: stub.GetDocument(pb.GetDocumentRequest(collection="private", doc_id="json"), metadata=globex),
            lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(name="private"), metadata=globex),
            lambda: stub.Query(pb.QueryRequest(collection="private", query="JSON"), metadata=globex),
            lambda: list(stub.QueryStream(pb.QueryRequest(collection="private", query="JSON"), metadata=globex)),
            lambda: stub.UpsertDocuments(
                pb.UpsertDocumentsRequest(
                    collection="private", documents=[pb.DocumentIn(id="json", text="overwritten")]
                ),
                metadata=globex,
            ),
            lambda: stub.DeleteDocument(pb.DeleteDocumentRequest(collection="private", doc_id="json"), metadata=globex),
            lambda: stub.DeleteByFilter(
                pb.DeleteByFilterRequest(collection="private", filters=title_is_json), metadata=globex
            ),
        ]
        for call in refused:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert error.value.details() == "collection 'private' does not exist"
        found = stub.Search(pb.SearchRequest(collection="private", query="JSON", mode="sparse"), metadata=acme)
        assert found.collection == "private" and found.hits[0].doc_id == "json"
        document = stub.GetDocument(pb.GetDocumentRequest(collection="private", doc_id="json"), metadata=acme)
        assert document.text.startswith("Python Library Documentation: package json")  # untouched
        documents = [pb.DocumentIn(id=f"grpc-{n}", text=f"{RUSSIAN} {n}") for n in range(3)]
        job = stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="private", documents=documents), metadata=acme)
        assert job.job_id
        with pytest.raises(grpc.RpcError) as error:
            stub.GetJob(pb.GetJobRequest(id=job.job_id), metadata=globex)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.GetJob(pb.GetJobRequest(id=job.job_id), metadata=acme).collection == "private"


def test_an_admin_acts_for_a_tenant_and_a_tenant_cannot(
    admin: httpx2.Client, tenants: dict[str, httpx2.Client]
) -> None:
    as_acme = admin.get("/v1/collections", headers={"X-Tenant": "acme"}).json()["collections"]
    assert "private" in [c["name"] for c in as_acme]
    refused = tenants["globex"].get("/v1/collections", headers={"X-Tenant": "acme"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "PERMISSION_DENIED"


def test_a_key_revoked_with_the_cli_is_refused_at_the_next_request(
    admin: httpx2.Client, orchestrator: Orchestrator
) -> None:
    key = key_of(admin, "acme", "read")
    reader = {"Authorization": f"Bearer {key}"}
    assert admin.get("/v1/collections", headers=reader).status_code == 200
    listed = subprocess.run(
        [sys.executable, "-m", "tritonrag.deploy.cli", "keys", "list", "--tenant", "acme"],
        env={**_env(orchestrator)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key_id = next(line.split()[0] for line in listed.splitlines() if "read" in line.split()[2] and "active" in line)
    assert key not in listed
    subprocess.run(
        [sys.executable, "-m", "tritonrag.deploy.cli", "keys", "revoke", key_id], env=_env(orchestrator), check=True
    )
    refused = admin.get("/v1/collections", headers=reader)
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "unknown or revoked API key"


def _env(orchestrator: Orchestrator) -> dict[str, str]:
    import os

    return {**os.environ, "TRITONRAG_DATA_DIR": str(orchestrator.data_dir)}


def hs256(**claims: Any) -> str:
    return jwt.encode({"sub": "ci", "exp": int(time.time()) + 300, **claims}, JWT_SECRET, algorithm="HS256")


def test_jwts_carry_their_tenant_and_scopes(orchestrator: Orchestrator, tenants: dict[str, httpx2.Client]) -> None:
    reader = {"Authorization": f"Bearer {hs256(tenant='acme', scope='read')}"}
    with httpx2.Client(base_url=orchestrator.http_url, timeout=30, headers=reader) as client:
        assert [c["name"] for c in client.get("/v1/collections").json()["collections"]] == ["private", "shared-name"]
        assert client.post("/v1/collections", json={"name": "nope"}).status_code == 403
    expired = {"Authorization": f"Bearer {hs256(tenant='acme', scope='read', exp=int(time.time()) - 600)}"}
    answer = httpx2.get(f"{orchestrator.http_url}/v1/collections", headers=expired)
    assert answer.status_code == 401 and "expired" in answer.json()["error"]["message"]


def test_metrics_on_the_api_port_are_for_admins(orchestrator: Orchestrator, tenants: dict[str, httpx2.Client]) -> None:
    assert httpx2.get(f"{orchestrator.http_url}/metrics").status_code == 401
    assert tenants["acme"].get("/metrics").status_code == 403
    metrics = httpx2.get(f"{orchestrator.http_url}/metrics", headers=ADMIN_HEADERS)
    assert metrics.status_code == 200 and 'collection="acme/private"' in metrics.text


def test_no_key_or_token_appears_in_the_logs(
    orchestrator: Orchestrator, admin: httpx2.Client, tenants: dict[str, httpx2.Client], log_path: Path
) -> None:
    token = hs256(tenant="acme", scope="read")
    for headers in ({"Authorization": f"Bearer {WRONG_KEY}"}, {"X-API-Key": WRONG_KEY}, {"Authorization": token}):
        assert httpx2.get(f"{orchestrator.http_url}/v1/collections", headers=headers).status_code == 401
    httpx2.get(f"{orchestrator.http_url}/v1/collections", headers={"Authorization": f"Bearer {token}"})
    logs = log_path.read_text(errors="replace")
    assert "caller=default/key:" in logs  # the access lines name callers by tenant and key id
    secrets = [ADMIN_KEY, WRONG_KEY, JWT_SECRET, token, *(client.headers["x-api-key"] for client in tenants.values())]
    for secret in secrets:
        assert secret not in logs
        assert secret[4:24] not in logs  # nor a recognisable part


def test_both_front_ends_serve_tls_alone_when_given_a_certificate(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path: Path
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    env = orchestrator_env(
        tiny_triton,
        tiny_repository,
        tmp_path / "data",
        TRITONRAG_API__TLS_CERT_FILE=str(cert),
        TRITONRAG_API__TLS_KEY_FILE=str(key),
    )
    server = start_orchestrator(env)
    try:
        assert server.http_url.startswith("https://")
        answer = httpx2.get(f"{server.http_url}/v1/collections", headers=ADMIN_HEADERS, verify=str(cert))
        assert answer.status_code == 200 and answer.json() == {"collections": []}
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(server.http_url.replace("https", "http") + "/healthz")
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.grpc_url, credentials) as channel:
            listed = pb_grpc.TritonRagStub(channel).ListCollections(
                pb.ListCollectionsRequest(), metadata=(("authorization", f"Bearer {ADMIN_KEY}"),), timeout=10
            )
            assert list(listed.collections) == []
        with grpc.insecure_channel(server.grpc_url) as plain, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.TritonRagStub(plain).ListCollections(pb.ListCollectionsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_orchestrator(server)
