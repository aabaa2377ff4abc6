"""Compact FHIR R4 validator for the target sandbox: Medplum's structural checks on common resources.

docs/medplum.md "Validation": unknown elements, wrong JSON types, array/single mismatches, bad primitive
formats, nulls are 400 `structure` with an `expression`. Messages and regexes follow Medplum's
validator (core typeschema/validation.ts). Empty strings are dropped before validation (docs/medplum.md, recorded case 20).
Types outside the table get the generic checks only (nulls, meta), never a false rejection. The tables
are pfsync.sandbox.target.schemas'; this module walks a resource against them.
"""

from __future__ import annotations

from typing import Any

from pfsync.sandbox.target.common import FhirError, Json, invalid
from pfsync.sandbox.target.schemas import (
    ALIASES,
    ANY,
    CHOICE_SUFFIXES,
    GENERIC_RESOURCE,
    LENIENT,
    NUMBER_TYPES,
    PRIMITIVES,
    REGEXES,
    SCHEMAS,
    Element,
)


def drop_empty_strings(value: Any) -> Any:
    """docs/medplum.md, recorded case 20: an empty string is silently dropped (and so is an object or array it leaves empty)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v2 = drop_empty_strings(v)
            if v2 == "" or (isinstance(v2, dict | list) and not v2 and v != v2):
                continue
            out[k] = v2
        return out
    if isinstance(value, list):
        items = [drop_empty_strings(v) for v in value]
        return [v for v in items if not (v == "" or (isinstance(v, dict) and not v))]
    return value


def _js_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _structure(path: str, text: str) -> FhirError:
    return invalid(text, [path], code="structure")


def _check_nulls(obj: Any, path: str) -> None:
    """Medplum's checkObjectForNull: null is only allowed inside a primitive array that has a `_x` partner."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            p = f"{path}.{key}"
            if value is None:
                raise _structure(p, "Invalid null value")
            if isinstance(value, list):
                partner = obj.get(key[1:] if key.startswith("_") else "_" + key)
                for i, item in enumerate(value):
                    if item is None:
                        if not (isinstance(partner, list) and i < len(partner) and partner[i]):
                            raise _structure(f"{p}[{i}]", "Invalid null value")
                    else:
                        _check_nulls(item, f"{p}[{i}]")
            elif isinstance(value, dict):
                _check_nulls(value, p)


def _check_primitive(value: Any, type_: str, path: str) -> None:
    expected = "boolean" if type_ == "boolean" else "number" if type_ in NUMBER_TYPES else "string"
    got = _js_type(value)
    if got != expected:
        raise _structure(path, f"Invalid JSON type: expected {expected}, but got {got}")
    if expected == "string":
        if not value.strip():
            raise _structure(path, "String must contain non-whitespace content")
        regex = REGEXES.get(type_)
        if regex is not None and not regex.match(value):
            raise _structure(path, f"Invalid {type_} format")
    elif expected == "number":
        if type_ != "decimal" and not float(value).is_integer():
            raise _structure(path, "Expected number to be an integer")
        if type_ == "positiveInt" and value <= 0:
            raise _structure(path, "Expected number to be positive")
        if type_ == "unsignedInt" and value < 0:
            raise _structure(path, "Expected number to be non-negative")


def _check_value(value: Any, type_: str, path: str) -> None:
    if type_ in PRIMITIVES:
        _check_primitive(value, type_, path)
        return
    if not isinstance(value, dict):
        raise _structure(path, f"Invalid JSON type: expected object, but got {_js_type(value)}")
    if type_ == "Resource":
        _check_object(value, _schema_for_resource(value, path), path)
        return
    schema = SCHEMAS.get(ALIASES.get(type_, type_))
    if schema is not None:
        _check_object(value, schema, path)


def _schema_for_resource(resource: Json, path: str) -> dict[str, Element]:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise invalid("Missing resource type", [path])
    return SCHEMAS.get(rtype, GENERIC_RESOURCE)


def _resolve_key(key: str, schema: dict[str, Element]) -> tuple[Element, str] | None:
    """-> (element, concrete type) for a JSON key, handling choice-of-type names like valueQuantity."""
    element = schema.get(key)
    if element is not None and element.type != "choice":
        return element, element.type
    for i in range(1, len(key)):
        if key[i].isupper():
            choice = schema.get(key[:i] + "[x]")
            if choice is not None:
                suffix = key[i:]
                type_ = CHOICE_SUFFIXES.get(suffix)
                if type_ is None or (choice.choices != ("*",) and type_ not in choice.choices):
                    return None
                return choice, type_
    return None


def _check_object(obj: Json, schema: dict[str, Element], path: str) -> None:
    # Resource types outside our table: check the elements we know, never reject the others.
    open_schema = schema is GENERIC_RESOURCE
    for key, value in obj.items():
        if key == "resourceType":
            continue
        p = f"{path}.{key}"
        if key.startswith("_"):
            if _resolve_key(key[1:], schema) is None and not open_schema:
                raise _structure(p, f'Invalid additional property "{key}"')
            continue  # primitive extension element: id/extension only, left unchecked
        resolved = _resolve_key(key, schema)
        if resolved is None and open_schema:
            continue
        if resolved is None:
            raise _structure(p, f'Invalid additional property "{key}"')
        element, type_ = resolved
        if type_ == ANY or type_ in LENIENT:
            continue
        if element.many:
            if not isinstance(value, list):
                raise _structure(p, "Expected array of values for property")
            for i, item in enumerate(value):
                if item is not None:
                    _check_value(item, type_, f"{p}[{i}]")
        else:
            if isinstance(value, list):
                raise _structure(p, "Expected single value for property")
            _check_value(value, type_, p)


def validate_resource(resource: Json) -> Json:
    """Return the resource as Medplum stores it (empty strings dropped) or raise FhirError(400)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise invalid("Missing resource type")
    rtype = resource["resourceType"]
    _check_nulls(resource, rtype)
    cleaned: Json = drop_empty_strings(resource)
    _check_object(cleaned, _schema_for_resource(cleaned, rtype), rtype)
    return cleaned
