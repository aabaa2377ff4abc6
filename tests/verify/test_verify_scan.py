"""verify_scan: reference classification, the reference walk, and the loader's content hash recomputed."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from pfsync.core.settings import SourceSettings
from pfsync.load.transform import Target, TransformContext, prepare, render
from pfsync.verify.scan import FoundRef, classify_reference, content_hash, references, source_ids

FHIR = "https://medplum.example/fhir/R4/"
BASE = "https://medplum.example/"
U1 = "0b43614f-65f0-435b-b65d-cf8de32c1825"
SYSTEMS = {"https://practicefusion.com/fhir/patient-id": "Patient"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"Patient/{U1}", FoundRef("literal", "Patient", U1)),
        (f"Patient/{U1}/_history/3", FoundRef("literal", "Patient", U1)),
        (f"{FHIR}Patient/{U1}", FoundRef("literal", "Patient", U1)),
        ("Patient/123", FoundRef("unresolved", "Patient", "123")),
        (f"urn:uuid:{U1}", FoundRef("unresolved", None, U1)),
        ("#contained-1", None),
        ("Patient?identifier=sys|1", None),
        ("https://elsewhere.example/fhir/Patient/1", None),
        ("", None),
        ("not a reference", None),
    ],
)
def test_classify_reference_table(value: str, expected: FoundRef | None) -> None:
    assert classify_reference(value, FHIR) == expected


def test_references_walks_nested_contained_and_logical_but_not_identifiers() -> None:
    resource = {
        "resourceType": "Encounter",
        "identifier": [{"system": "https://practicefusion.com/fhir/patient-id", "value": "self"}],
        "subject": {"identifier": {"system": "https://practicefusion.com/fhir/patient-id", "value": "p1"}},
        "participant": [{"individual": {"reference": f"Practitioner/{U1}"}}],
        "contained": [{"resourceType": "Location", "managingOrganization": {"reference": "urn:uuid:" + U1}}],
        "extension": [{"url": "x", "valueReference": {"reference": "#c"}}],
        "partOf": {"identifier": {"system": "urn:other", "value": "v"}},
    }
    found = sorted(references(resource, FHIR, SYSTEMS), key=lambda r: r.kind)
    assert found == [
        FoundRef("literal", "Practitioner", U1),
        FoundRef("logical", "Patient", "p1"),
        FoundRef("unresolved", None, U1),
    ]


def test_source_ids_reads_only_our_system() -> None:
    resource = {"identifier": [{"system": "a", "value": "1"}, {"system": "b", "value": "2"}, {"system": "a"}]}
    assert source_ids(resource, "a") == ["1"]


def as_medplum_holds_it(body: bytes, mid: str) -> dict[str, Any]:
    """What a read from Medplum gives back: id and server meta added, attachments presigned."""
    resource: dict[str, Any] = orjson.loads(body)
    resource["id"] = mid
    resource["meta"] |= {"versionId": "v1", "lastUpdated": "2026-11-25T12:00:00Z", "project": "p"}
    for content in resource.get("content", []):
        att = content["attachment"]
        if att.get("url", "").startswith("Binary/"):
            att["url"] = f"{BASE}storage/{att['url'][7:]}/v1?Expires=1&Signature=s"
    return resource


@pytest.mark.parametrize(
    "resource",
    [
        {
            "resourceType": "Patient",
            "id": "p1",
            "name": [{"family": "Doe", "given": ["Jane", ""]}],
            "meta": {"lastUpdated": "2020-01-01T00:00:00Z", "tag": [{"system": "t", "code": "c"}]},
        },
        {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}},
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "content": [{"attachment": {"url": "Binary/b1", "contentType": "text/plain"}}],
        },
    ],
    ids=["patient-with-tags", "reference", "attachment"],
)
def test_content_hash_equals_the_loaders_render_hash(resource: dict[str, Any]) -> None:
    # Adapter guard: if pfsync.load.transform changes how it hashes, this test fails first.
    ctx = TransformContext(SourceSettings(name="s", base_url="https://ehr.example/fhir"))
    rendered = render(prepare(copy.deepcopy(resource), ctx), lambda ref: Target("Patient", U1), ctx)
    held = as_medplum_holds_it(rendered.body, "m1")
    assert content_hash(held, BASE) == rendered.hash
    held["status"] = "entered-in-error"
    assert content_hash(held, BASE) != rendered.hash
