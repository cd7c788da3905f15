"""Metadata filters → a query over the store's ``doc_metadata`` table.

A filter compiles to one SQLAlchemy ``SELECT doc_id …``, the same statement for SQLite and PostgreSQL: a
condition is an indexed lookup in ``doc_metadata``, ``and`` is ``INTERSECT`` and ``or`` is ``UNION``, so
the cost follows the number of matching rows, not the size of the collection. The store turns the
document set into the allowed chunk ids, which both indexes apply before their top-k cut.

Semantics: metadata is per document and every chunk inherits it. ``eq`` matches a field equal
to the value, or a list-valued field with an element equal to it; ``in`` matches when the field
(or any element of a list-valued field) equals any of the values; ``gt``/``gte``/``lt``/``lte``
compare numbers and never match strings or booleans. Strings, numbers and booleans never
equal one another. A field that a document lacks matches nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, and_, false, intersect, or_, select, union

from tritonrag.clients.wire.schema import And, Condition, Filter
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.store.documents import DOC_METADATA, DocQuery, SqlValue, encode_scalar

_RANGE_OPS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
_COLUMNS = DOC_METADATA.c


def compile_filter(filter_: Filter) -> DocQuery:
    """The query that selects the ids of the documents ``filter_`` matches."""
    if isinstance(filter_, Condition):
        return select(_COLUMNS.doc_id).distinct().where(_COLUMNS.key == filter_.field, _condition(filter_))
    parts = [compile_filter(part).subquery() for part in (filter_.and_ if isinstance(filter_, And) else filter_.or_)]
    combine = intersect if isinstance(filter_, And) else union
    return select(combine(*(select(part.c.doc_id) for part in parts)).subquery().c.doc_id)


def _condition(condition: Condition) -> ColumnElement[bool]:
    value = condition.value
    if condition.op in _RANGE_OPS:
        assert isinstance(value, int | float)  # the schema allows numbers only
        _, number = encode_scalar(value)  # an int beyond 64 bits as a float, as it is stored
        return and_(_COLUMNS.kind == "n", _RANGE_OPS[condition.op](_COLUMNS.value, number))
    if condition.op == "eq":
        if isinstance(value, list):
            raise InvalidArgumentError("'eq' takes one value; use 'in' to match any of several", field="filters")
        kind, encoded = encode_scalar(value)
        return and_(_COLUMNS.kind == kind, _COLUMNS.value == encoded)
    assert isinstance(value, list)  # the schema gives 'in' a list
    by_kind: dict[str, list[SqlValue]] = {}
    for element in value:
        kind, encoded = encode_scalar(element)
        by_kind.setdefault(kind, []).append(encoded)
    if not by_kind:
        return false()
    return or_(*(and_(_COLUMNS.kind == kind, _COLUMNS.value.in_(values)) for kind, values in by_kind.items()))
