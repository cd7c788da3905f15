"""Schemathesis hooks for fuzzing the HTTP API (``SCHEMATHESIS_HOOKS=tests.fuzz_hooks``, from the repository root).

What schemathesis generates from the OpenAPI document mostly names resources that do not exist, and stops at
404. These hooks make generated requests also name resources that do (the collection ``fuzz`` with its
documents, an upsert job, the served models), seeded on the first request and again after a request deleted
them, and mix in the bad-input corpus of ``tests/fuzz_corpus.py``, which the gRPC front-end gets too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2
import schemathesis
from hypothesis import strategies as st

from tests.fuzz_corpus import (
    BAD_FILTERS,
    BAD_METADATA,
    BAD_STRINGS,
    MODELS,
    SEED_COLLECTION,
    SEED_DOCUMENTS,
    seed,
)

_job_ids: dict[str, str | None] = {}  # per base URL: the seeded job's id, once seeded


def _strict_json(value: Any) -> bool:
    """Whether strict JSON holds ``value``, as it must for schemathesis to send it (no NaN, no infinity):
    ``test_fuzz.py`` sends the rest of the corpus itself."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def _in_path(value: str) -> bool:
    """Whether a URL can carry ``value``: UTF-8, percent-encoded (a lone surrogate is no UTF-8)."""
    return value.encode(errors="replace").decode() == value and "\n" not in value  # a line feed: see filter_case


_PATH_STRINGS = [value for value in BAD_STRINGS if _in_path(value)]


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case[Any]) -> bool:
    """No path parameter with a line feed (percent-encoded by then): Starlette's ``{doc_id:path}`` and
    ``{model_id:path}`` end at one, so that no route matches and the native 404 answers, even under
    ``/v1/models`` (docs/SECURITY.md, "Fuzzing"; no document id holds a control character, nor does a model
    name)."""
    return not any("%0A" in str(value) for value in (case.path_parameters or {}).values())


def _seeded(config: Any, base_url: str) -> str | None:
    """Seed the server at ``base_url`` unless done; the seeded job's id. ``config``: the run's, with its headers."""
    if base_url not in _job_ids:
        with httpx2.Client(base_url=base_url, headers=config.headers or {}, timeout=120) as http:
            _job_ids[base_url] = seed(http)
    return _job_ids[base_url]


def _one_of(value: Any, others: Sequence[Any]) -> st.SearchStrategy[Any]:
    """``value`` half of the time, else one of ``others``."""
    return st.one_of(st.just(value), st.sampled_from(others)) if others else st.just(value)


@schemathesis.hook
def flatmap_path_parameters(context: schemathesis.HookContext, parameters: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Each path parameter as generated, or naming a seeded resource, or from the corpus."""
    operation = context.operation
    assert operation is not None
    if not parameters:
        return st.just(parameters)
    job_id = _seeded(operation.schema.config, operation.schema.get_base_url())
    known: dict[str, Sequence[Any]] = {
        "name": (SEED_COLLECTION,),
        "doc_id": [document["id"] for document in SEED_DOCUMENTS],
        "job_id": (job_id,) if job_id else (),
        "model_id": MODELS,
    }
    return st.fixed_dictionaries(
        {key: _one_of(value, [*known.get(key, ()), *_PATH_STRINGS]) for key, value in parameters.items()}
    )


# Body fields by name: the values mixed into generated bodies wherever such a field is.
_BODY_VALUES: dict[str, list[Any]] = {
    key: [value for value in values if _strict_json(value)]
    for key, values in {
        "collection": (SEED_COLLECTION, *BAD_STRINGS),
        "model": (*MODELS, *BAD_STRINGS),
        "id": BAD_STRINGS,
        "query": BAD_STRINGS,
        "filters": BAD_FILTERS,
        "metadata": BAD_METADATA,
    }.items()
}


# Valid bodies by path, beside the generated ones: these seldom pass every rule of an operation across fields
# (the OpenAI parameters accepted in shape but not supported, above all), so that fuzzing also starts from valid
# bodies, to reach the work behind validation: retrieval, generation, writes.
_VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "/v1/collections/{name}/documents": [{"documents": SEED_DOCUMENTS}],
    "/v1/collections/{name}/documents:delete": [{"filters": {"field": "year", "op": "lt", "value": 1900}}],
    "/v1/search": [{"collection": SEED_COLLECTION, "query": "capital of France", "rerank": True, "mmr": {}}],
    "/v1/query": [
        {"collection": SEED_COLLECTION, "query": "capital of France", "sampling": {"max_tokens": 8}, "stream": stream}
        for stream in (False, True)
    ],
    "/v1/chat/completions": [
        {
            "model": "generator",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8,
            "stream": stream,
            "tritonrag": {"collection": SEED_COLLECTION},
        }
        for stream in (False, True)
    ],
    "/v1/completions": [
        {"model": "generator", "prompt": "Name a colour.", "max_tokens": 8, "stream": stream}
        for stream in (False, True)
    ],
    "/v1/embeddings": [{"model": "embedder", "input": ["capital of France", "tea"], "encoding_format": "float"}],
}


def _body(value: Any) -> st.SearchStrategy[Any]:
    """``value`` with each field named in ``_BODY_VALUES`` as generated or from the corpus, at any depth."""
    if isinstance(value, Mapping):
        return st.fixed_dictionaries(
            {
                key: _one_of(item, _BODY_VALUES[key]) if key in _BODY_VALUES else _body(item)
                for key, item in value.items()
            }
        )
    if isinstance(value, list):
        return st.tuples(*map(_body, value)).map(list)
    return st.just(value)


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """The generated body or a valid one, each with the corpus mixed in."""
    operation = context.operation
    assert operation is not None
    _seeded(operation.schema.config, operation.schema.get_base_url())
    return st.sampled_from([body, *_VALID_BODIES.get(operation.path, ())]).flatmap(_body)


@schemathesis.hook
def after_call(
    context: schemathesis.HookContext, case: schemathesis.Case[Any], response: schemathesis.Response
) -> None:
    """Seed again after a request deleted seeded resources, so that later ones find them again."""
    deleting = case.method == "DELETE" or case.path.endswith("documents:delete")
    if deleting and response.status_code < 300 and (case.path_parameters or {}).get("name") == SEED_COLLECTION:
        _job_ids.pop(case.operation.schema.get_base_url(), None)
