"""Tenants below the front-ends: collection keys ``<tenant>/<name>``, the wrappers that make them, and stores from
before tenants adopted by the default tenant."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.fakes import FakeServices
from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn, SearchRequest, UpsertRequest
from tritonrag.server.config import IndexSettings
from tritonrag.server.errors import NotFoundError
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.security.principal import Principal, open_principal
from tritonrag.server.security.tenancy import TenantCollections, TenantSearch
from tritonrag.server.store.catalog import Catalog


def as_tenant(tenant: str) -> None:
    open_principal(Principal(tenant, frozenset({Scope.write}), f"key:{tenant}"))


def test_each_tenant_sees_its_own_collections_under_the_names_it_gave() -> None:
    fakes = FakeServices.create()
    collections, search = TenantCollections(fakes.collections), TenantSearch(fakes.search)

    async def scenario() -> None:
        as_tenant("acme")
        assert (await collections.create_collection(CollectionCreate(name="docs"))).name == "docs"
        upsert = UpsertRequest(documents=[DocumentIn(id="a", text="anvils")])
        assert (await collections.upsert_documents("docs", upsert)).collection == "docs"
        found = await search.search(SearchRequest(collection="docs", query="anvils"))
        assert (found.collection, [hit.doc_id for hit in found.hits]) == ("docs", ["a"])
        as_tenant("globex")
        assert await collections.list_collections() == []
        for attempt in (collections.get_collection("docs"), search.search(SearchRequest(collection="docs", query="x"))):
            with pytest.raises(NotFoundError) as missing:
                await attempt
            assert "globex/" not in missing.value.message and "acme" not in missing.value.message
        with pytest.raises(NotFoundError, match=re.escape("'../acme' does not exist")):
            await collections.get_collection("../acme")
        await collections.create_collection(CollectionCreate(name="docs"))

    asyncio.run(scenario())
    assert sorted(fakes.collections.collections) == ["acme/docs", "globex/docs"]


def test_collections_from_before_tenants_become_the_default_tenants(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    for name in ("old", "moved"):
        catalog.create_collection(CollectionCreate(name=name))
        (tmp_path / "collections" / name).mkdir(parents=True)
        (tmp_path / "collections" / name / "store.sqlite").write_text(name)
    job = catalog.create_job("old", 3).info.id
    # A start that crashed after moving "moved"'s directory and before renaming it in the catalog:
    (tmp_path / "collections" / "default").mkdir()
    (tmp_path / "collections" / "moved").rename(tmp_path / "collections" / "default" / "moved")

    async def dimension() -> int:
        return 8

    CollectionRegistry(tmp_path, catalog, IndexSettings(), dimension)
    assert catalog.list_collections() == ["default/moved", "default/old"]
    assert catalog.get_collection("default/old").name == "default/old"
    assert catalog.get_job(job).info.collection == "default/old"
    for name in ("old", "moved"):
        assert (tmp_path / "collections" / "default" / name / "store.sqlite").read_text() == name
        assert not (tmp_path / "collections" / name).exists()
