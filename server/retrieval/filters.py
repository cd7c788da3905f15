"""Metadata filters → SQL over the store's ``doc_metadata`` table.

A filter compiles to one ``SELECT doc_id …``: a condition is an indexed lookup in
``doc_metadata``, ``and`` is ``INTERSECT`` and ``or`` is ``UNION``, so the cost follows the
number of matching rows, not the size of the collection. The store turns the document set
into the allowed chunk ids, which both indexes apply before their top-k cut.

Semantics: metadata is per document and every chunk inherits it. ``eq`` matches a field equal
to the value, or a list-valued field with an element equal to it; ``in`` matches when the field
(or any element of a list-valued field) equals any of the values; ``gt``/``gte``/``lt``/``lte``
compare numbers and never match strings or booleans. Strings, numbers and booleans never
equal one another. A field that a document lacks matches nothing.
"""

from __future__ import annotations

from tritonrag.clients.wire.schema import And, Condition, Filter
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.store.documents import DocQuery, SqlValue, encode_scalar

_RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_LOOKUP = "SELECT DISTINCT doc_id FROM doc_metadata WHERE key = ? AND "


def compile_filter(filter_: Filter) -> DocQuery:
    """The query that selects the ids of the documents ``filter_`` matches."""
    sql, params = _compile(filter_)
    return DocQuery(sql, tuple(params))


def _compile(filter_: Filter) -> tuple[str, list[SqlValue]]:
    if isinstance(filter_, Condition):
        return _condition(filter_)
    parts, operator = (filter_.and_, "INTERSECT") if isinstance(filter_, And) else (filter_.or_, "UNION")
    compiled = [_compile(part) for part in parts]
    sql = f" {operator} ".join(f"SELECT doc_id FROM ({part_sql})" for part_sql, _ in compiled)
    return sql, [param for _, part_params in compiled for param in part_params]


def _condition(condition: Condition) -> tuple[str, list[SqlValue]]:
    value = condition.value
    if condition.op in _RANGE_OPS:
        assert isinstance(value, int | float)  # the schema allows numbers only
        _, number = encode_scalar(value)  # an int beyond SQLite's 64 bits as a float, as it is stored
        return f"{_LOOKUP}kind = 'n' AND value {_RANGE_OPS[condition.op]} ?", [condition.field, number]
    if condition.op == "eq":
        if isinstance(value, list):
            raise InvalidArgumentError("'eq' takes one value; use 'in' to match any of several", field="filters")
        return f"{_LOOKUP}kind = ? AND value = ?", [condition.field, *encode_scalar(value)]
    assert isinstance(value, list)  # the schema gives 'in' a list
    by_kind: dict[str, list[SqlValue]] = {}
    for element in value:
        kind, encoded = encode_scalar(element)
        by_kind.setdefault(kind, []).append(encoded)
    if not by_kind:
        return "SELECT doc_id FROM doc_metadata WHERE 0", []
    tests = [f"(kind = ? AND value IN ({', '.join('?' * len(values))}))" for values in by_kind.values()]
    params: list[SqlValue] = [condition.field]
    for kind, values in by_kind.items():
        params += [kind, *values]
    return f"{_LOOKUP}({' OR '.join(tests)})", params
