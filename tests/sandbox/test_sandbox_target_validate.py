"""Target sandbox: validation as the real server does it (docs/medplum.md "Validation", recorded cases 20-25)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from target_fixtures import fhir_client, patient

from pfsync.sandbox.target.common import FhirError
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.sandbox.target.validate import validate_resource

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


@pytest.mark.parametrize(
    ("change", "text", "expression"),
    [
        ({"gender": None}, "Invalid null value", "Patient.gender"),
        ({"foo": "bar"}, 'Invalid additional property "foo"', "Patient.foo"),
        ({"birthDate": "02/01/1980"}, "Invalid date format", "Patient.birthDate"),
        ({"gender": 1}, "Invalid JSON type: expected string, but got number", "Patient.gender"),
        ({"meta": {"source": "not a uri"}}, "Invalid uri format", "Patient.meta.source"),
        ({"name": {"family": "Doe"}}, "Expected array of values for property", "Patient.name"),
        ({"deceasedDateTime": "2020-13-01"}, "Invalid dateTime format", "Patient.deceasedDateTime"),
        ({"gender": "fe male "}, "Invalid code format", "Patient.gender"),
        (
            {"identifier": [{"system": "urn:a b", "value": "x"}]},
            "Invalid uri format",
            "Patient.identifier[0].system",
        ),
    ],
)
def test_target_validation_rejects_with_structure_issue(
    target: TargetSandbox, change: dict[str, Any], text: str, expression: str
) -> None:
    with fhir_client(target) as c:
        r = c.post("Patient", json={**patient("val"), **change})
    assert r.status_code == 400
    issue = r.json()["issue"][0]
    assert (issue["code"], issue["details"]["text"], issue["expression"]) == ("structure", text, [expression])
    assert "id" not in r.json()  # 400 outcomes carry no id


def test_target_validation_drops_empty_strings(target: TargetSandbox) -> None:
    body = patient("empty")
    body["name"][0]["family"] = ""
    with fhir_client(target) as c:
        r = c.post("Patient", json=body)
    assert r.status_code == 201  # docs/medplum.md, recorded case 20: dropped, not rejected
    assert r.json()["name"] == [{"given": ["Jane"]}]


def test_target_validation_rejects_bad_instant_in_observation() -> None:
    with pytest.raises(FhirError) as err:
        validate_resource(
            {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "issued": "2020-01-01"}
        )
    assert err.value.outcome["issue"][0]["details"]["text"] == "Invalid instant format"


def _synthea(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(path.iterdir()):
        opener: Any = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


@pytest.mark.parametrize("name", ["synthea-small", "synthea-full"])
def test_target_validation_accepts_all_synthea_resources_without_ids(name: str) -> None:
    rejected = []
    for resource in _synthea(FIXTURES / name):
        resource.pop("id", None)
        try:
            validate_resource(resource)
        except FhirError as err:
            rejected.append((resource["resourceType"], err.outcome["issue"][0]))
    assert rejected == []
