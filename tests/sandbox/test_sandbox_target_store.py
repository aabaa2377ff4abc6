"""Target sandbox: state survives a restart on the same state_dir; reset and inspection helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from target_fixtures import MRN, batch, conditional_put_entry, fhir_client, patient, target_token

from pfsync.sandbox.target.server import TargetSandbox


def test_target_state_survives_restart(tmp_path: Path, target_factory: Callable[..., TargetSandbox]) -> None:
    first = target_factory(tmp_path)
    token = target_token(first)
    with fhir_client(first) as c:
        created = c.post("", json=batch(*(conditional_put_entry(patient(f"r{i}")) for i in range(5)))).json()
    first.stop()

    second = target_factory(tmp_path)
    assert second.count("Patient") == 5
    headers = {"Authorization": f"Bearer {token}"}  # a token issued before the restart still works
    again = httpx.post(
        second.fhir_url,
        headers=headers,
        json=batch(*(conditional_put_entry(patient(f"r{i}")) for i in range(5))),
    ).json()
    assert [e["response"]["status"] for e in again["entry"]] == ["200"] * 5
    assert [e["resource"]["meta"] for e in again["entry"]] == [
        e["resource"]["meta"] for e in created["entry"]
    ]


def test_target_reset_wipes_data_and_faults(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("wipe"))
    target.faults.throttle_next(5)
    target.reset()
    assert target.count() == 0 and target.faults.pending()["throttle"] == 0
    assert target.stats.token_requests == 0


def test_target_inspection_helpers(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        pid = c.post("Patient", json=patient("insp")).json()["id"]
        c.delete(f"Patient/{c.post('Patient', json=patient('gone')).json()['id']}")
        c.post("Condition", json={"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"}})
    assert target.count() == 2 and target.count("Patient") == 1
    assert [p["id"] for p in target.resources("Patient")] == [pid]
    assert [p["id"] for p in target.find_by_identifier("Patient", MRN, "insp")] == [pid]
    assert target.find_by_identifier("Patient", MRN, "gone") == []
