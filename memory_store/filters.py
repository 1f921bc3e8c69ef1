"""Validation of Chroma where-filters against the keys a collection really has.

Chroma silently matches nothing for a misspelt key; here an unknown key, operator or value
type raises BadFilterError naming it, before the filter reaches Chroma.
"""

from __future__ import annotations

from typing import Any

from memory_store.errors import BadFilterError

COMPARISONS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")
MEMBERSHIP = ("$in", "$nin")
LOGICAL = ("$and", "$or")
ORDERED = ("$gt", "$gte", "$lt", "$lte")  # only for numbers in Chroma


def _check_value(key: str, op: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int in Python but not in Chroma's metadata: keep them apart.
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if not ok:
        names = "/".join(t.__name__ for t in types)
        raise BadFilterError(f"where-filter value for {key!r} with {op} must be {names}, got {value!r}")
    if op in ORDERED and not any(t in (int, float) for t in types):
        raise BadFilterError(f"where-filter operator {op} needs a numeric key, {key!r} is {types[0].__name__}")


def _check_key(key: str, condition: Any, keys: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    if key not in keys:
        raise BadFilterError(f"unknown where-filter key {key!r}; known keys: {', '.join(sorted(keys))}")
    types = keys[key]
    if not isinstance(condition, dict):
        _check_value(key, "$eq", condition, types)
        return {key: condition}
    if len(condition) != 1:
        raise BadFilterError(f"where-filter for {key!r} must hold exactly one operator, got {condition!r}")
    ((op, value),) = condition.items()
    if op in COMPARISONS:
        _check_value(key, op, value, types)
    elif op in MEMBERSHIP:
        if not isinstance(value, list) or not value:
            raise BadFilterError(f"where-filter operator {op} for {key!r} needs a non-empty list, got {value!r}")
        for item in value:
            _check_value(key, op, item, types)
    else:
        raise BadFilterError(
            f"unknown where-filter operator {op!r} for {key!r}; allowed: {', '.join(COMPARISONS + MEMBERSHIP)}"
        )
    return {key: {op: value}}


def validate_where(where: dict[str, Any] | None, keys: dict[str, tuple[type, ...]]) -> dict[str, Any] | None:
    """Check a where-filter and return it in the one-key-per-dict form Chroma accepts.

    Accepts ``{key: value}``, ``{key: {op: value}}``, ``{"$and"|"$or": [filters]}`` and
    several keys in one dict (read as $and). Raises BadFilterError naming the bad part.
    """
    if where is None or where == {}:
        return None
    if not isinstance(where, dict):
        raise BadFilterError(f"where-filter must be a dict, got {type(where).__name__}: {where!r}")
    clauses: list[dict[str, Any]] = []
    for key, condition in where.items():
        if key in LOGICAL:
            if not isinstance(condition, list) or not condition:
                raise BadFilterError(f"where-filter {key} needs a non-empty list of filters, got {condition!r}")
            parts = [validate_where(part, keys) for part in condition]
            parts = [p for p in parts if p is not None]
            if not parts:
                raise BadFilterError(f"where-filter {key} holds only empty filters: {condition!r}")
            clauses.append(parts[0] if len(parts) == 1 else {key: parts})
        elif key.startswith("$"):
            raise BadFilterError(f"unknown where-filter operator {key!r} at top level; allowed: {', '.join(LOGICAL)}")
        else:
            clauses.append(_check_key(key, condition, keys))
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def and_filters(*filters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Combine already-valid filters with $and, dropping the empty ones."""
    present = [f for f in filters if f]
    if not present:
        return None
    return present[0] if len(present) == 1 else {"$and": present}
