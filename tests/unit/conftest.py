"""Fixtures of the front-end tests: the fake services (tests/fakes.py), one of each."""

from __future__ import annotations

import pytest

from tests.fakes import FakeAnswers, FakeCollections, FakeReadiness, FakeSearch, FakeServices


@pytest.fixture
def fakes() -> FakeServices:
    """Fresh fakes; an upsert of more than two documents becomes a job."""
    return FakeServices.create(inline_max_documents=2)


@pytest.fixture
def collections(fakes: FakeServices) -> FakeCollections:
    return fakes.collections


@pytest.fixture
def search(fakes: FakeServices) -> FakeSearch:
    return fakes.search


@pytest.fixture
def answers(fakes: FakeServices) -> FakeAnswers:
    return fakes.answers


@pytest.fixture
def readiness(fakes: FakeServices) -> FakeReadiness:
    return fakes.readiness
