"""pfsync.load.transform: identity, meta, normalisation and reference rewriting of one resource."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pfsync.core.marks import HASH_TAG_SYSTEM, escape_token, identifier_query, resource_hash_from_meta
from pfsync.core.settings import SourceSettings
from pfsync.load.transform import (
    Ref,
    Target,
    TransformContext,
    TransformError,
    collect_refs,
    parse_reference,
    prepare,
    render,
)

BASE = "https://ehr.example/fhir/r4/v1/abc"
CTX = TransformContext(SourceSettings(name="practice-a", base_url=BASE))
LOADED = {("Patient", "p1"): "mp-1", ("Practitioner", "dr1"): "mp-2", ("Encounter", "e1"): "mp-3"}
BY_ID = {sid: t for (t, sid) in LOADED}


def resolve(ref: Ref) -> Target | None:
    rtype = ref.type or BY_ID.get(ref.id)
    if rtype is None:
        return None
    return Target(rtype, LOADED.get((rtype, ref.id)))


def run(resource: dict[str, Any], ctx: TransformContext = CTX) -> dict[str, Any]:
    rendered = render(prepare(resource, ctx), resolve, ctx)
    out: dict[str, Any] = orjson.loads(rendered.body)
    return out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Patient/p1", Ref("Patient", "p1")),
        ("Patient/p1/_history/2", Ref("Patient", "p1")),
        (f"{BASE}/Patient/p1", Ref("Patient", "p1")),
        (f"{BASE}/Patient/p1/_history/7", Ref("Patient", "p1")),
        ("urn:uuid:0b43614f-65f0-435b-b65d-cf8de32c1825", Ref(None, "0b43614f-65f0-435b-b65d-cf8de32c1825")),
        ("#coverage", None),
        ("https://other.example/fhir/Patient/p1", None),
        ("Patient?identifier=sys|1", None),
        ("urn:oid:1.2.3", None),
        ("", None),
    ],
)
def test_parse_reference_forms(value: str, expected: Ref | None) -> None:
    assert parse_reference(value, BASE) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Patient/p1", "Patient/mp-1"),
        ("Patient/p1/_history/3", "Patient/mp-1"),
        (f"{BASE}/Practitioner/dr1", "Practitioner/mp-2"),
        ("#contained-1", "#contained-1"),
        ("https://elsewhere.example/Patient/p1", "https://elsewhere.example/Patient/p1"),
    ],
)
def test_render_rewrites_reference_forms(value: str, expected: str) -> None:
    out = run({"resourceType": "Observation", "id": "o1", "subject": {"reference": value}})
    assert out["subject"]["reference"] == expected


def test_render_rewrites_urn_uuid_by_id_alone() -> None:
    uuid = "0b43614f-65f0-435b-b65d-cf8de32c1825"
    LOADED[("Encounter", uuid)] = "mp-enc"
    BY_ID[uuid] = "Encounter"
    out = run({"resourceType": "Observation", "id": "o1", "encounter": {"reference": f"urn:uuid:{uuid}"}})
    assert out["encounter"]["reference"] == "Encounter/mp-enc"


def test_render_walks_contained_extensions_and_nested_arrays() -> None:
    out = run(
        {
            "resourceType": "ExplanationOfBenefit",
            "id": "eob1",
            "contained": [
                {"resourceType": "Coverage", "id": "coverage", "beneficiary": {"reference": "Patient/p1"}}
            ],
            "insurance": [{"coverage": {"reference": "#coverage"}}],
            "extension": [{"url": "http://x", "valueReference": {"reference": "Practitioner/dr1"}}],
            "item": [{"encounter": [{"reference": "Encounter/e1"}]}],
        }
    )
    assert out["contained"][0]["beneficiary"]["reference"] == "Patient/mp-1"
    assert out["contained"][0]["id"] == "coverage"  # contained ids stay: #refs need them
    assert out["insurance"][0]["coverage"]["reference"] == "#coverage"
    assert out["extension"][0]["valueReference"]["reference"] == "Practitioner/mp-2"
    assert out["item"][0]["encounter"][0]["reference"] == "Encounter/mp-3"


def test_render_makes_logical_reference_for_known_but_unloaded_target() -> None:
    rendered = render(
        prepare(
            {
                "resourceType": "Encounter",
                "id": "e9",
                "serviceProvider": {"reference": "Organization/o7", "display": "Clinic"},
            },
            CTX,
        ),
        resolve,
        CTX,
    )
    out = orjson.loads(rendered.body)
    ref = out["serviceProvider"]
    assert "reference" not in ref
    assert ref["identifier"] == {"system": "https://practicefusion.com/fhir/organization-id", "value": "o7"}
    assert ref["display"] == "Clinic"
    assert rendered.logical == [Ref("Organization", "o7")]


def test_render_leaves_unknown_urn_and_reports_it() -> None:
    rendered = render(
        prepare(
            {
                "resourceType": "Claim",
                "id": "c1",
                "prescription": {"reference": "urn:uuid:11111111-2222-3333-4444-555555555555"},
            },
            CTX,
        ),
        resolve,
        CTX,
    )
    assert rendered.unknown == [Ref(None, "11111111-2222-3333-4444-555555555555")]


def test_prepare_sets_identity_and_drops_id() -> None:
    out = run({"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mrn", "value": "42"}]})
    assert "id" not in out
    assert out["identifier"] == [
        {"system": "urn:mrn", "value": "42"},
        {"system": "https://practicefusion.com/fhir/patient-id", "value": "p1"},
    ]


def test_prepare_keeps_existing_identity_once() -> None:
    ident = {"system": "https://practicefusion.com/fhir/patient-id", "value": "p1"}
    out = run({"resourceType": "Patient", "id": "p1", "identifier": [ident]})
    assert out["identifier"] == [ident]


def test_prepare_identifier_template_with_source() -> None:
    ctx = TransformContext(SourceSettings(name="b", base_url=BASE, identifier_system="urn:{source}:{type}"))
    out = run({"resourceType": "Patient", "id": "p1"}, ctx)
    assert out["identifier"] == [{"system": "urn:b:Patient", "value": "p1"}]


def test_prepare_replaces_foreign_meta_and_keeps_tags() -> None:
    out = run(
        {
            "resourceType": "Patient",
            "id": "p1",
            "meta": {
                "versionId": "9",
                "lastUpdated": "2020-01-01T00:00:00Z",
                "source": "not a uri",
                "tag": [{"system": "urn:t", "code": "x"}, {"system": HASH_TAG_SYSTEM, "code": "old"}],
                "profile": ["http://p"],
            },
        }
    )
    meta = out["meta"]
    assert "versionId" not in meta and "lastUpdated" not in meta
    assert meta["source"] == BASE
    assert meta["profile"] == ["http://p"]
    assert meta["tag"][0] == {"system": "urn:t", "code": "x"}
    assert next(t for t in meta["tag"] if t["system"] == HASH_TAG_SYSTEM)["code"] != "old"


def test_prepare_meta_source_without_base_is_a_urn() -> None:
    ctx = TransformContext(SourceSettings(name="default", base_url=""))
    assert run({"resourceType": "Patient", "id": "p1"}, ctx)["meta"]["source"] == "urn:pfsync:source:default"


def test_prepare_without_id_is_an_error() -> None:
    with pytest.raises(TransformError, match="no id"):
        prepare({"resourceType": "Patient"}, CTX)


def test_render_hash_is_stable_and_content_sensitive() -> None:
    def h(resource: dict[str, Any]) -> str:
        return render(prepare(resource, CTX), resolve, CTX).hash

    a = {
        "resourceType": "Patient",
        "id": "p1",
        "gender": "female",
        "meta": {"lastUpdated": "2020-01-01T00:00:00Z"},
    }
    b = {
        "meta": {"lastUpdated": "2024-05-05T00:00:00Z"},
        "gender": "female",
        "id": "p1",
        "resourceType": "Patient",
    }
    assert h(dict(a)) == h(dict(b))  # key order and foreign meta do not matter
    assert h(dict(a)) != h({**a, "gender": "male"})
    out = run(dict(a))
    assert resource_hash_from_meta(out) == h(dict(a))


@pytest.mark.parametrize(
    ("resource", "expected", "fixes"),
    [
        ({"gender": None}, {}, 1),
        ({"name": [{"family": "", "given": ["  "]}]}, {}, 5),  # cascades: emptied parents go too
        ({"telecom": [], "address": {}}, {}, 2),
        (
            {"name": [{"family": "Doe", "given": ["Jane", ""]}]},
            {"name": [{"family": "Doe", "given": ["Jane"]}]},
            1,
        ),
        (
            {"given": ["A", None], "_given": [None, {"extension": [{"url": "u", "valueString": "x"}]}]},
            {"given": ["A", None], "_given": [None, {"extension": [{"url": "u", "valueString": "x"}]}]},
            0,
        ),
    ],
)
def test_prepare_normalises(resource: dict[str, Any], expected: dict[str, Any], fixes: int) -> None:
    p = prepare({"resourceType": "Patient", "id": "p1", **resource}, CTX)
    body = {k: v for k, v in p.resource.items() if k not in ("resourceType", "identifier", "meta")}
    assert body == expected
    assert p.fixes == fixes


def test_prepare_without_normalise_keeps_blanks() -> None:
    ctx = TransformContext(CTX.source, normalize=False)
    p = prepare({"resourceType": "Patient", "id": "p1", "gender": ""}, ctx)
    assert p.resource["gender"] == "" and p.fixes == 0


def test_collect_refs_does_not_change_resource() -> None:
    resource = {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p1"}, "note": []}
    assert collect_refs(resource, CTX) == [Ref("Patient", "p1")]
    assert resource["note"] == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [("abc", "abc"), ("a,b", "a\\,b"), ("a|b", "a\\|b"), ("a\\b", "a\\\\b"), ("$x", "\\$x")],
)
def test_escape_token(value: str, expected: str) -> None:
    assert escape_token(value) == expected


def test_identifier_query_encodes_value() -> None:
    q = identifier_query("urn:sys", "a b&c,d")
    assert q.startswith("identifier=urn:sys|")
    assert "&" not in q[len("identifier=") :] and " " not in q
