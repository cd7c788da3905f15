"""Authentication and authorisation: the key store, JWTs, and every route and method of both front-ends refusing
callers without a credential (401 / UNAUTHENTICATED) and read keys that write (403 / PERMISSION_DENIED)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from google.protobuf import symbol_database

from tests.fakes import FakeServices, grpc_channel
from tests.harness import serving
from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.server.api.auth import Guard
from tritonrag.server.api.grpc_service import SERVICE_NAME
from tritonrag.server.config import (
    ApiSettings,
    AuthSettings,
    JwtSettings,
    RateLimitSettings,
)
from tritonrag.server.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from tritonrag.server.security.auth import Authenticator, prepare_keys
from tritonrag.server.security.keys import KeyStore
from tritonrag.server.security.principal import DEFAULT_TENANT, Principal
from tritonrag.server.security.ratelimit import RateLimiter
from tritonrag.server.store.database import StoreLocation

SECRET = "an-hs256-secret-of-enough-length-0123456789"
ISSUER, AUDIENCE = "https://issuer.example", "tritonrag"

# The routes a read key may call besides every GET: retrieval and generation.
READ_POSTS = {"/v1/search", "/v1/query", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
READ_METHODS = {"Search", "Query", "QueryStream"}  # besides Get* and List*


def required_scope(method: str, path: str) -> Scope:
    if path.startswith(("/v1/keys", "/v1/cache")):
        return Scope.admin
    return Scope.read if method == "get" or path in READ_POSTS else Scope.write


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    store = KeyStore(tmp_path / "keys.sqlite")
    yield store
    store.close()


def authenticator(keys: KeyStore, **jwt_settings: Any) -> Authenticator:
    return Authenticator(AuthSettings(jwt=JwtSettings(**jwt_settings)), keys)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# The key store


def test_a_key_made_by_one_process_is_known_to_every_process_over_the_same_store(
    store_location: StoreLocation, tmp_path: Path
) -> None:
    """Orchestrator replicas over a shared database (or processes over one data directory) share their keys."""
    first, second = (KeyStore(tmp_path / "keys.sqlite", store_location) for _ in range(2))
    created = first.create("acme", [Scope.read], "replica a")
    assert second.verify(created.key) == first.get(created.id)
    second.revoke(created.id)
    assert first.verify(created.key) is None and first.list("acme")[0].revoked_at is not None
    first.close()
    second.close()


def test_only_the_hash_of_a_key_is_stored_and_a_revoked_key_is_refused(keys: KeyStore) -> None:
    created = keys.create("acme", [Scope.read, Scope.write], "ingest bot")
    assert created.key.startswith("trk_") and len(created.key) == 47
    assert created.key.encode() not in Path(keys.where).read_bytes()
    assert Path(keys.where).stat().st_mode & 0o777 == 0o600
    auth = authenticator(keys)
    principal = run(auth.authenticate(f"Bearer {created.key}", None, None))
    assert (principal.tenant, principal.scopes, principal.subject) == (
        "acme",
        frozenset({Scope.read, Scope.write}),
        f"key:{created.id}",
    )
    assert run(auth.authenticate(None, created.key, None)) == principal  # X-API-Key
    keys.revoke(created.id)
    with pytest.raises(UnauthenticatedError, match="unknown or revoked"):
        run(auth.authenticate(f"Bearer {created.key}", None, None))
    assert keys.get(created.id).revoked_at is not None


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "a credential is needed"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer"),
        ("Bearer ", "must be 'Bearer"),
        ("Bearer trk_not-a-key-of-this-store-000000000000000", "unknown or revoked"),
    ],
)
def test_missing_and_malformed_credentials_are_refused(keys: KeyStore, authorization: str | None, message: str) -> None:
    with pytest.raises(UnauthenticatedError, match=message) as refused:
        run(authenticator(keys).authenticate(authorization, None, None))
    assert "trk_not-a-key" not in refused.value.message


def test_only_an_admin_acts_for_another_tenant(keys: KeyStore) -> None:
    admin = keys.create(DEFAULT_TENANT, [Scope.admin]).key
    writer = keys.create("acme", [Scope.write]).key
    auth = authenticator(keys)
    assert run(auth.authenticate(f"Bearer {admin}", None, "acme")).tenant == "acme"
    assert run(auth.authenticate(f"Bearer {writer}", None, "acme")).tenant == "acme"  # its own
    with pytest.raises(PermissionDeniedError, match="x-tenant"):
        run(auth.authenticate(f"Bearer {writer}", None, "globex"))
    with pytest.raises(InvalidArgumentError, match="x-tenant"):
        run(auth.authenticate(f"Bearer {admin}", None, "../etc"))


def test_the_first_start_makes_one_admin_key_and_the_operators_key_is_stored(
    keys: KeyStore, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    prepare_keys(keys, AuthSettings())
    printed = capsys.readouterr().err
    key = next(line.strip() for line in printed.splitlines() if line.strip().startswith("trk_"))
    assert keys.where in printed and key not in caplog.text
    assert run(authenticator(keys).authenticate(f"Bearer {key}", None, None)).allows(Scope.admin)
    prepare_keys(keys, AuthSettings())  # a second start makes none
    assert capsys.readouterr().err == "" and len(keys.list()) == 1
    chosen = "an-operator-chosen-admin-key-0123456789"
    prepare_keys(keys, AuthSettings(admin_key=chosen))
    assert run(authenticator(keys).authenticate(f"Bearer {chosen}", None, None)).tenant == DEFAULT_TENANT
    with pytest.raises(InvalidArgumentError, match="32 characters"):
        keys.add("short", DEFAULT_TENANT, [Scope.admin])


def test_auth_switched_off_admits_everyone_as_the_default_admin_and_warns(
    keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    prepare_keys(keys, AuthSettings(enabled=False))
    assert "auth.enabled is false" in caplog.text
    principal = run(Authenticator(AuthSettings(enabled=False), keys).authenticate(None, None, None))
    assert principal.tenant == DEFAULT_TENANT and principal.allows(Scope.admin)


# JWTs


def token(key: Any, algorithm: str = "HS256", headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "svc-1", "tenant": "acme", "scope": "read write", "iss": ISSUER, "aud": AUDIENCE}
    payload |= {"exp": now + 300, "iat": now} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=algorithm, headers=headers)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_valid_hs256_token_names_its_tenant_scopes_and_subject(keys: KeyStore) -> None:
    auth = authenticator(keys, hs256_secret=SECRET, issuer=ISSUER, audience=AUDIENCE)
    principal = run(auth.authenticate(f"Bearer {token(SECRET)}", None, None))
    assert (principal.tenant, principal.scopes, principal.subject) == (
        "acme",
        frozenset({Scope.read, Scope.write}),
        "jwt:svc-1",
    )


def test_rs256_tokens_verify_with_a_public_key_file_and_with_a_jwks_file(
    keys: KeyStore, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(rsa_key))
    by_file = authenticator(keys, rs256_public_key_file=pem, issuer=ISSUER, audience=AUDIENCE)
    assert run(by_file.authenticate(f"Bearer {token(rsa_key, 'RS256')}", None, None)).tenant == "acme"
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())) | {"kid": "k1", "use": "sig"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    by_jwks = authenticator(keys, jwks_file=jwks, issuer=ISSUER, audience=AUDIENCE)
    signed = token(rsa_key, "RS256", headers={"kid": "k1"})
    assert run(by_jwks.authenticate(f"Bearer {signed}", None, None)).subject == "jwt:svc-1"
    with pytest.raises(UnauthenticatedError, match="no key 'k2'"):
        run(by_jwks.authenticate(f"Bearer {token(rsa_key, 'RS256', headers={'kid': 'k2'})}", None, None))


def test_rs256_tokens_verify_with_a_jwks_url_fetched_off_the_event_loop(
    keys: KeyStore, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())) | {"kid": "k1", "use": "sig"}
    fetches: list[str] = []

    async def jwks(scope: Any, receive: Any, send: Any) -> None:
        fetches.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"keys": [jwk]}).encode()})

    with serving(jwks) as url:
        auth = authenticator(keys, jwks_url=f"{url}/.well-known/jwks.json")

        async def twice() -> list[Principal]:
            signed = f"Bearer {token(rsa_key, 'RS256', headers={'kid': 'k1'})}"
            return [await auth.authenticate(signed, None, None) for _ in range(2)]

        principals = run(twice())
    assert [p.subject for p in principals] == ["jwt:svc-1"] * 2
    assert fetches == ["/.well-known/jwks.json"]  # the key set is cached


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"exp": None}, 'missing the "exp" claim'),
        ({"nbf": int(time.time()) + 3600}, "not yet valid"),
        ({"aud": "another-service"}, "Audience doesn't match"),
        ({"iss": "https://evil.example"}, "Invalid issuer"),
        ({"tenant": None}, "'tenant' claim is not a tenant name"),
        ({"tenant": "a/b"}, "'tenant' claim is not a tenant name"),
    ],
)
def test_tokens_with_bad_claims_are_refused(keys: KeyStore, claims: dict[str, Any], message: str) -> None:
    auth = authenticator(keys, hs256_secret=SECRET, issuer=ISSUER, audience=AUDIENCE, leeway_s=0)
    with pytest.raises(UnauthenticatedError, match=message):
        run(auth.authenticate(f"Bearer {token(SECRET, **claims)}", None, None))


def test_a_token_with_no_known_scope_can_do_nothing(keys: KeyStore) -> None:
    auth = authenticator(keys, hs256_secret=SECRET)
    principal = run(auth.authenticate(f"Bearer {token(SECRET, scope='openid profile')}", None, None))
    assert principal.scopes == frozenset()
    with pytest.raises(PermissionDeniedError, match="'read'"):
        principal.require(Scope.read)


def test_forged_tokens_are_refused(keys: KeyStore, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(rsa_key))
    rs_only = authenticator(keys, rs256_public_key_file=pem)
    claims = {"tenant": "acme", "scope": "admin", "exp": int(time.time()) + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]  # "none" takes no key
    with pytest.raises(UnauthenticatedError, match="algorithm 'none' is not accepted"):
        run(rs_only.authenticate(f"Bearer {unsigned}", None, None))
    # HS/RS confusion: an HMAC signed with the public key, which an attacker knows.
    # PyJWT refuses to make one (a PEM as HMAC secret), so it is made by hand.
    parts = [{"alg": "HS256", "typ": "JWT"}, {"tenant": "acme", "scope": "admin", "exp": int(time.time()) + 60}]
    signed = ".".join(base64url(json.dumps(part).encode()) for part in parts)
    mac = hmac.new(public_pem(rsa_key), signed.encode(), hashlib.sha256).digest()
    forged = f"{signed}.{base64url(mac)}"
    with pytest.raises(UnauthenticatedError, match="algorithm 'HS256' is not accepted"):
        run(rs_only.authenticate(f"Bearer {forged}", None, None))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(UnauthenticatedError, match="Signature verification failed"):
        run(rs_only.authenticate(f"Bearer {token(other, 'RS256')}", None, None))
    hs = authenticator(keys, hs256_secret=SECRET)
    with pytest.raises(UnauthenticatedError, match="Signature verification failed"):
        run(hs.authenticate(f"Bearer {token('another-secret-of-enough-length-0123456789')}", None, None))


# Every route and method


@pytest.fixture
def guard(keys: KeyStore) -> Guard:
    return Guard(Authenticator(AuthSettings(), keys), RateLimiter(RateLimitSettings(enabled=False)))


@pytest.fixture
def client(guard: Guard, keys: KeyStore) -> Iterator[TestClient]:
    fakes = FakeServices.create()
    app = fakes.http_app(ApiSettings(), guard=guard, keys=keys)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def operations(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document, path parameters filled in."""
    paths = client.get("/openapi.json").json()["paths"]
    found = [
        (method, path.replace("{name}", "docs").replace("{doc_id}", "a").replace("{job_id}", "j"))
        for path, methods in paths.items()
        for method in methods
    ]
    return [(method, path.replace("{key_id}", "k").replace("{model_id}", "generator")) for method, path in found]


def test_every_route_but_health_needs_a_credential(client: TestClient) -> None:
    listed = operations(client)
    assert len(listed) >= 20 and ("post", "/v1/keys") in listed
    for method, path in listed:
        answer = client.request(method, path, json={})
        if path in ("/healthz", "/readyz"):
            assert answer.status_code != 401, path
            continue
        assert answer.status_code == 401, f"{method} {path}: {answer.status_code}"
        assert answer.headers["www-authenticate"] == "Bearer", path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        wrong = client.request(method, path, json={}, headers={"X-API-Key": "trk_wrong-key-000000000000000000000000"})
        assert wrong.status_code == 401, f"{method} {path} with a wrong key"


def test_a_read_key_reads_but_never_writes_and_only_admins_administer(client: TestClient, keys: KeyStore) -> None:
    read = {"Authorization": f"Bearer {keys.create('acme', [Scope.read]).key}"}
    write = {"Authorization": f"Bearer {keys.create('acme', [Scope.write]).key}"}
    for method, path in operations(client):
        if path in ("/healthz", "/readyz"):
            continue
        needed = required_scope(method, path)
        as_reader = client.request(method, path, json={}, headers=read).status_code
        as_writer = client.request(method, path, json={}, headers=write).status_code
        assert (as_reader == 403) == (needed is not Scope.read), f"{method} {path} as reader: {as_reader}"
        assert (as_writer == 403) == (needed is Scope.admin), f"{method} {path} as writer: {as_writer}"
        assert 401 not in (as_reader, as_writer)


def test_admins_manage_keys_over_http_without_a_restart(client: TestClient, keys: KeyStore) -> None:
    admin = {"Authorization": f"Bearer {keys.create(DEFAULT_TENANT, [Scope.admin]).key}"}
    created = client.post("/v1/keys", json={"tenant": "acme", "scopes": ["read"], "name": "bot"}, headers=admin)
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    assert client.get("/v1/collections", headers={"X-API-Key": key}).status_code == 200
    listed = client.get("/v1/keys", params={"tenant": "acme"}, headers=admin).json()["keys"]
    assert [(k["id"], k["scopes"], k["revoked_at"]) for k in listed] == [(key_id, ["read"], None)]
    assert "key" not in listed[0]
    assert client.delete(f"/v1/keys/{key_id}", headers=admin).json()["revoked_at"] is not None
    assert client.get("/v1/collections", headers={"X-API-Key": key}).status_code == 401
    assert client.delete("/v1/keys/nope", headers=admin).status_code == 404
    bad = client.post("/v1/keys", json={"tenant": "a/b", "scopes": []}, headers=admin)
    assert bad.status_code == 422
    assert bad.json()["error"]["message"].startswith(
        "scopes: List should have at least 1 item after validation, not 0; tenant: String should match"
    )


@pytest.fixture
async def guarded_channel(guard: Guard) -> AsyncIterator[grpc.aio.Channel]:
    fakes = FakeServices.create()
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers, guard=guard) as channel:
        yield channel


async def call_status(channel: grpc.aio.Channel, method: Any, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status of ``method`` called with an empty request (a stream read to its end)."""
    request_class = symbol_database.Default().GetSymbol(method.input_type.full_name)
    path = f"/{SERVICE_NAME}/{method.name}"
    serialize, parse = request_class.SerializeToString, lambda data: data
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=serialize, response_deserializer=parse)
            async for _ in call(request_class(), metadata=metadata):
                pass
        else:
            await channel.unary_unary(path, request_serializer=serialize, response_deserializer=parse)(
                request_class(), metadata=metadata
            )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.anyio
async def test_every_grpc_method_needs_a_credential_and_a_read_key_never_writes(
    guarded_channel: grpc.aio.Channel, keys: KeyStore
) -> None:
    methods = list(pb.DESCRIPTOR.services_by_name["TritonRag"].methods)
    assert len(methods) >= 12
    read = (("authorization", f"Bearer {keys.create('acme', [Scope.read]).key}"),)
    wrong = (("x-api-key", "trk_wrong-key-000000000000000000000000"),)
    for method in methods:
        assert await call_status(guarded_channel, method, ()) == grpc.StatusCode.UNAUTHENTICATED, method.name
        assert await call_status(guarded_channel, method, wrong) == grpc.StatusCode.UNAUTHENTICATED, method.name
        reads = method.name in READ_METHODS or method.name.startswith(("Get", "List"))
        as_reader = await call_status(guarded_channel, method, read)
        assert (as_reader == grpc.StatusCode.PERMISSION_DENIED) == (not reads), f"{method.name}: {as_reader}"
