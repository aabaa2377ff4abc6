"""Property tests: the resource transformer either transforms or raises TransformError, nothing else.

The loader quarantines a TransformError with its reason (pfsync/load/writes.py); any other exception
would crash the run on one bad resource. References are checked in every form the transformer
claims to understand (transform.py docstring), wherever they sit in the resource.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfsync.core.marks import HASH_TAG_SYSTEM, resource_hash_from_meta
from pfsync.core.settings import SourceSettings
from pfsync.load.transform import (
    Ref,
    Target,
    TransformContext,
    TransformError,
    parse_reference,
    prepare,
    render,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = "https://fhir.example.com/fhir/r4/v1/practice-1"
CTX = TransformContext(SourceSettings(name="src", base_url=BASE))

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_keys = st.one_of(st.text(max_size=8), st.sampled_from(["_", "_given", "given", "reference", "meta",
                                                         "identifier", "tag", "id", "contained"]))  # fmt: skip
_json = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=15,
)  # fmt: skip


@st.composite
def wild_resources(draw: st.DrawFn, identity: bool = False) -> dict[str, Any]:
    """Anything a JSON object parsed from an export line could be, biased toward resource shapes.
    `identity`: always a string resourceType and id (the shapes that get as far as rendering)."""
    body: dict[str, Any] = draw(st.dictionaries(_keys, _json, max_size=6))
    good_type = st.sampled_from(["Patient", "Observation", "Basic"])
    good_id = st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True)
    if identity or draw(st.booleans()):
        body["resourceType"] = draw(good_type if identity else st.one_of(good_type, _json))
    if identity or draw(st.booleans()):
        body["id"] = draw(good_id if identity else st.one_of(good_id, _json))
    for name in ("meta", "identifier"):
        if draw(st.booleans()):
            body[name] = draw(_json)
    return body


def _resolve_all(ref: Ref) -> Target:
    return Target(ref.type or "Patient", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ref.type}/{ref.id}")))


def _resolve_none_loaded(ref: Ref) -> Target | None:
    return Target(ref.type, None) if ref.type else None


def _unknown(ref: Ref) -> Target | None:
    return None


RESOLVERS = [_resolve_all, _resolve_none_loaded, _unknown]


@FAST
@given(wild_resources(), st.sampled_from(RESOLVERS), st.booleans())
def test_transform_any_object_transforms_or_raises_transform_error(
    resource: dict[str, Any], resolve: Any, normalize: bool
) -> None:
    ctx = TransformContext(CTX.source, normalize=normalize)
    try:
        prepared = prepare(copy.deepcopy(resource), ctx)
    except TransformError as exc:
        assert str(exc)  # the reason goes to the quarantine
        return
    rendered = render(prepared, resolve, ctx)
    body = orjson.loads(rendered.body)
    assert "id" not in body  # Medplum assigns ids (docs/medplum.md "Ids and identity")
    assert {"system": ctx.system(prepared.type), "value": prepared.sid} in body["identifier"]
    assert resource_hash_from_meta(body) == rendered.hash


@FAST
@given(wild_resources(identity=True))
def test_transform_is_deterministic(resource: dict[str, Any]) -> None:
    # Identical input must give identical bytes: Medplum's no-op detection depends on it.
    outs = []
    for _ in range(2):
        try:
            prepared = prepare(copy.deepcopy(resource), CTX)
        except TransformError:
            return
        outs.append(render(prepared, _resolve_all, CTX))
    assert outs[0].body == outs[1].body and outs[0].hash == outs[1].hash


@FAST
@given(wild_resources(identity=True))
def test_transform_of_its_own_output_keeps_the_hash(resource: dict[str, Any]) -> None:
    # Re-exported data that already carries our hash tag (a round trip through Medplum) hashes the same.
    # (A meta.tag that is not a list is invalid FHIR and is replaced by ours, so it cannot round-trip.)
    if isinstance(resource.get("meta"), dict) and not isinstance(resource["meta"].get("tag", []), list):
        del resource["meta"]["tag"]
    try:
        first = render(prepare(copy.deepcopy(resource), CTX), _resolve_all, CTX)
    except TransformError:
        return
    again = orjson.loads(first.body)
    again["id"] = resource["id"]
    assert render(prepare(again, CTX), _resolve_all, CTX).hash == first.hash


def test_transform_normalisation_is_idempotent() -> None:
    resource = {"resourceType": "Patient", "id": "p", "name": [{"given": [None], "_given": None}]}
    first = render(prepare(copy.deepcopy(resource), CTX), _resolve_all, CTX)
    again = orjson.loads(first.body)
    again["id"] = "p"
    assert render(prepare(again, CTX), _resolve_all, CTX).hash == first.hash


# ------------------------------------------------------------------------------------------------
# References in every form, anywhere in the resource

_ids = st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True)
_types = st.sampled_from(["Patient", "Practitioner", "Encounter", "Organization", "Location"])


@st.composite
def reference_forms(draw: st.DrawFn) -> tuple[str, Ref | None]:
    """(reference string, the source resource it names or None if it must stay as it is)."""
    rtype, rid = draw(_types), draw(_ids)
    uid = str(draw(st.uuids()))
    forms: list[tuple[str, Ref | None]] = [
        (f"{rtype}/{rid}", Ref(rtype, rid)),
        (f"{rtype}/{rid}/_history/{draw(st.integers(1, 99))}", Ref(rtype, rid)),
        (f"{BASE}/{rtype}/{rid}", Ref(rtype, rid)),
        (f"urn:uuid:{uid}", Ref(None, uid)),
        (f"#{rid}", None),  # contained
        (f"{rtype}?identifier=http://x|{rid}", None),  # conditional
        (f"https://other.example.com/fhir/{rtype}/{rid}", None),  # foreign absolute
        (f"{BASE}-evil/{rtype}/{rid}", None),  # a prefix of our base is not our base
        ("", None),
        (f"urn:uuid:not-a-uuid-{rid}", None),
        (f"{rtype.lower()}/{rid}", None),
    ]
    return draw(st.sampled_from(forms))


def _place(resource: dict[str, Any], where: int, ref: dict[str, Any]) -> None:
    """Put a Reference somewhere: top level, in a list, in an extension, in a contained resource."""
    if where == 0 and "subject" not in resource:
        resource["subject"] = ref
    elif where == 1:
        resource.setdefault("performer", []).append(ref)
    elif where == 2:
        resource.setdefault("extension", []).append({"url": "http://ext", "valueReference": ref})
    elif where == 3:
        resource.setdefault("contained", []).append(
            {"resourceType": "Provenance", "id": "c1", "target": [ref]}
        )
    else:
        resource.setdefault("component", []).append({"deep": [{"deeper": {"x": ref}}]})


@FAST
@given(st.lists(st.tuples(reference_forms(), st.integers(0, 4)), min_size=1, max_size=8),
       st.sampled_from(["all", "none_loaded", "unknown"]))  # fmt: skip
def test_transform_rewrites_every_reference_form_wherever_it_sits(
    placed: list[tuple[tuple[str, Ref | None], int]], mode: str
) -> None:
    resource: dict[str, Any] = {"resourceType": "Observation", "id": "obs-1", "status": "final"}
    for (text, _), where in placed:
        _place(resource, where, {"reference": text, "display": "d"})
    expected = [ref for (text, ref), _ in placed if text]  # empty references are normalised away
    prepared = prepare(copy.deepcopy(resource), CTX)
    key = lambda r: (r.type or "", r.id)  # noqa: E731 - order follows the dict walk, not placement
    assert sorted((r for _, r in prepared.refs), key=key) == sorted((r for r in expected if r), key=key)
    for (text, ref), _ in placed:
        assert parse_reference(text, BASE) == ref
    resolve = {"all": _resolve_all, "none_loaded": _resolve_none_loaded, "unknown": _unknown}[mode]
    rendered = render(prepared, resolve, CTX)
    body = rendered.body.decode()
    for (text, ref), _ in placed:
        if ref is None or not text:
            if text:
                assert orjson.dumps(text).decode() in body  # left exactly as it was
            continue
        target = resolve(ref)
        if target is not None and target.mid is not None:
            assert f'"{target.type}/{target.mid}"' in body
        if target is not None and target.mid is None:
            # never a dangling literal reference: a logical one carrying the source id
            assert {"system": CTX.system(target.type), "value": ref.id} in _identifiers(orjson.loads(body))
    if mode == "all":
        # no source-id literal reference survives
        for (text, ref), _ in placed:
            if ref is not None and ref.type is not None:
                assert f'"reference":"{text}"' not in body


def _identifiers(node: Any) -> list[Any]:
    found: list[Any] = []
    if isinstance(node, dict):
        if isinstance(node.get("identifier"), dict):
            found.append(node["identifier"])
        for value in node.values():
            found += _identifiers(value)
    elif isinstance(node, list):
        for value in node:
            found += _identifiers(value)
    return found


# ------------------------------------------------------------------------------------------------
# Deep nesting and odd shapes


def _nested(depth: int, kind: str) -> Any:
    node: Any = {"reference": "Patient/p1"}
    for _ in range(depth):
        node = [node] if kind == "list" else {"x": node}
    return node


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize(
    "depth",
    [
        10,
        200,
        300,
        600,
        1000,
    ],
)
def test_transform_deep_nesting_is_quarantined_not_a_crash(depth: int, kind: str) -> None:
    # orjson parses up to 1024 levels, so the loader can be handed any of these.
    line = orjson.dumps({"resourceType": "Basic", "id": "deep", "extension": [{"url": "u", "x": {"y": 1}}]})
    resource = orjson.loads(line)
    resource["extension"][0]["x"] = _nested(depth, kind)
    try:
        rendered = render(prepare(resource, CTX), _resolve_all, CTX)
    except TransformError:
        return
    orjson.loads(rendered.body)


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient", "id": "a", "": [1, 2]},
        {"resourceType": "Patient", "id": "a", "name": [{"": ["x"]}]},
        {"resourceType": "Patient", "id": "a", "": "empty key, scalar value"},
        {"resourceType": "Patient", "id": "a", "identifier": "not-a-list"},
        {"resourceType": "Patient", "id": "a", "identifier": [None, 3, "x"]},
        {"resourceType": "Patient", "id": "a", "meta": "nope"},
        {"resourceType": "Patient", "id": "a", "meta": {"tag": {"system": HASH_TAG_SYSTEM}}},
        {"resourceType": "Patient", "id": "a", "reference": 5},
        {"resourceType": "Patient", "id": "a", "link": [{"other": {"reference": None}}]},
        {"resourceType": "Patient", "id": "   "},
        {"resourceType": "Patient", "id": 7},
        {"resourceType": "", "id": "a"},
        {"id": "a"},
    ],
)
def test_transform_odd_shapes_never_crash(resource: dict[str, Any]) -> None:
    try:
        render(prepare(copy.deepcopy(resource), CTX), _resolve_all, CTX)
    except TransformError as exc:
        assert str(exc)
