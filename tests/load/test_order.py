"""Load order and the up-front list of types Medplum must be asked about (pfsync.load.order)."""

from __future__ import annotations

from pathlib import Path

from load_helpers import write_ndjson

from pfsync.core.settings import SourceSettings
from pfsync.load.idmap import IdMap
from pfsync.load.order import dependency_order
from pfsync.load.transform import TransformContext

CTX = TransformContext(SourceSettings(name="t", base_url="https://ehr.example/fhir"))


def _files(tmp_path: Path) -> list[Path]:
    return [
        write_ndjson(tmp_path / "Observation.ndjson", [
            {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"},
             "encounter": {"reference": "Encounter/e1"}},
        ]),
        write_ndjson(tmp_path / "Encounter.ndjson", [
            {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}},
        ]),
        write_ndjson(tmp_path / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}]),
    ]  # fmt: skip


def test_order_puts_referenced_types_first_and_lists_types_new_to_the_id_map(tmp_path: Path) -> None:
    files = _files(tmp_path)
    idmap = IdMap(tmp_path / "idmap.sqlite", target="https://medplum.example/fhir/R4/")
    unknown: list[str] = []
    ordered = dependency_order(files, idmap, CTX, lambda: None, unknown.append)
    assert [p.name for p in ordered] == ["Patient.ndjson", "Encounter.ndjson", "Observation.ndjson"]
    assert unknown == ["Observation", "Encounter", "Patient"]  # each once, as the scan finds it

    # Once Medplum's ids are known (a re-sync), nothing needs asking, except a type with a new identity.
    for rtype, sid in (("Patient", "p1"), ("Encounter", "e1"), ("Observation", "o1")):
        idmap.record(rtype, sid, f"m-{sid}", "1", "h")
    write_ndjson(tmp_path / "Encounter.ndjson", [
        {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Encounter", "id": "e2", "subject": {"reference": "Patient/p1"}},
    ])  # fmt: skip
    again: list[str] = []
    dependency_order(files, idmap, CTX, lambda: None, again.append)
    assert again == ["Encounter"]
    idmap.close()


def test_order_puts_files_with_attachments_first_among_equally_ready_ones(tmp_path: Path) -> None:
    """Attachment copies run beside the other files' Bundles instead of trailing after them."""
    files = [
        write_ndjson(tmp_path / "Condition.ndjson", [
            {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}},
        ]),
        write_ndjson(tmp_path / "DocumentReference.ndjson", [
            {"resourceType": "DocumentReference", "id": "d1", "subject": {"reference": "Patient/p1"},
             "content": [{"attachment": {"contentType": "text/plain",
                                         "url": "https://ehr.example/fhir/Binary/b1"}}]},
            {"resourceType": "DocumentReference", "id": "d2", "subject": {"reference": "Patient/p1"},
             "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}]},
        ]),
        write_ndjson(tmp_path / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}]),
    ]  # fmt: skip
    idmap = IdMap(tmp_path / "idmap.sqlite", target="https://medplum.example/fhir/R4/")
    ordered = dependency_order(files, idmap, CTX, lambda: None)
    # The DocumentReference file is the larger one: by size alone it would come last.
    assert [p.name for p in ordered] == ["Patient.ndjson", "DocumentReference.ndjson", "Condition.ndjson"]
    idmap.close()
