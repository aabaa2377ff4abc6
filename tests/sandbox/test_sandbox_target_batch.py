"""Target sandbox: batch Bundles (docs/medplum.md "Batch Bundles", recorded cases 14-19, 30, 36)."""

from __future__ import annotations

import uuid
from typing import Any

from target_fixtures import MRN, batch, conditional_put_entry, fhir_client, patient

from pfsync.sandbox.target.server import TargetSandbox


def _statuses(bundle: dict) -> list[str]:  # type: ignore[type-arg]
    return [e["response"]["status"] for e in bundle["entry"]]


def test_target_batch_conditional_puts_create_then_noop(target: TargetSandbox) -> None:
    body = batch(*(conditional_put_entry(patient(f"b-{i}")) for i in range(3)))
    with fhir_client(target) as c:
        first = c.post("", json=body).json()
        second = c.post("", json=body).json()
    assert first["type"] == "batch-response" and _statuses(first) == ["201", "201", "201"]
    entry = first["entry"][0]
    assert entry["response"]["location"] == f"Patient/{entry['resource']['id']}"
    assert entry["response"]["outcome"]["id"] == "created"
    assert "etag" not in entry["response"]
    assert _statuses(second) == ["200", "200", "200"]
    assert [e["resource"]["meta"] for e in second["entry"]] == [e["resource"]["meta"] for e in first["entry"]]


def test_target_batch_duplicate_identity_fails_second_entry(target: TargetSandbox) -> None:
    body = batch(
        conditional_put_entry(patient("dup", given="First")),
        conditional_put_entry(patient("dup", given="Second")),
    )
    with fhir_client(target) as c:
        r = c.post("", json=body).json()
    assert _statuses(r) == ["201", "400"]
    issue = r["entry"][1]["response"]["outcome"]["issue"][0]
    assert issue["details"]["text"] == "Resource ID did not match resolved ID"
    assert issue["expression"] == ["Patient.id"]
    assert [p["name"][0]["given"] for p in target.find_by_identifier("Patient", MRN, "dup")] == [["First"]]


def test_target_batch_multiple_matches_is_entry_400(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("multi"))
        c.post("Patient", json=patient("multi"))
        r = c.post(
            "", json=batch(conditional_put_entry(patient("multi")), conditional_put_entry(patient("ok")))
        )
    assert r.status_code == 200 and _statuses(r.json()) == ["400", "201"]
    issue = r.json()["entry"][0]["response"]["outcome"]["issue"][0]
    assert issue["details"]["text"] == "Conditional PUT matched multiple resources"
    assert issue["expression"] == ["Bundle.entry[0].request.url"]


def test_target_batch_invalid_entry_does_not_stop_siblings(target: TargetSandbox) -> None:
    body = batch(
        conditional_put_entry(patient("ok1")),
        conditional_put_entry(patient("bad", foo="bar")),
        conditional_put_entry(patient("ok2")),
    )
    with fhir_client(target) as c:
        r = c.post("", json=body).json()
    assert _statuses(r) == ["201", "400", "201"]
    assert (
        r["entry"][1]["response"]["outcome"]["issue"][0]["details"]["text"]
        == 'Invalid additional property "foo"'
    )
    assert "resource" not in r["entry"][1]


def test_target_batch_runs_posts_before_puts_but_answers_in_request_order(target: TargetSandbox) -> None:
    def post(v: str) -> dict[str, Any]:
        return {"resource": patient(v), "request": {"method": "POST", "url": "Patient"}}

    body = batch(
        conditional_put_entry(patient("put1")),
        post("post1"),
        conditional_put_entry(patient("put2")),
        post("post2"),
    )
    with fhir_client(target) as c:
        r = c.post("", json=body).json()
    values = [e["resource"]["identifier"][0]["value"] for e in r["entry"]]
    assert values == ["put1", "post1", "put2", "post2"]
    stamps = [e["resource"]["meta"]["lastUpdated"] for e in r["entry"]]
    assert max(stamps[1], stamps[3]) <= min(stamps[0], stamps[2])


def test_target_transaction_is_processed_like_a_batch(target: TargetSandbox) -> None:
    body = batch(
        conditional_put_entry(patient("t1")),
        conditional_put_entry(patient("t1", given="x", foo=1)),
        type_="transaction",
    )
    with fhir_client(target) as c:
        r = c.post("", json=body).json()
    assert r["type"] == "transaction-response" and _statuses(r) == ["201", "400"]


def test_target_batch_rewrites_urn_uuid_references(target: TargetSandbox) -> None:
    urn = f"urn:uuid:{uuid.uuid4()}"
    cond = {"resourceType": "Condition", "subject": {"reference": urn}, "code": {"text": "x"}}
    body = batch(
        {"fullUrl": urn, **conditional_put_entry(patient("urn"))},
        {"resource": cond, "request": {"method": "POST", "url": "Condition"}},
    )
    with fhir_client(target) as c:
        r = c.post("", json=body).json()
    assert _statuses(r) == ["201", "201"]
    assert r["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{r['entry'][0]['resource']['id']}"


def test_target_batch_conditional_reference_resolves_in_put_order_not_post(target: TargetSandbox) -> None:
    cond = {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient?identifier={MRN}|cr"},
        "code": {"text": "x"},
        "identifier": [{"system": MRN, "value": "cond-cr"}],
    }
    body = batch(
        conditional_put_entry(patient("cr")),
        conditional_put_entry(cond),
        {"resource": cond, "request": {"method": "POST", "url": "Condition"}},
    )
    with fhir_client(target) as c:
        r = c.post("", json=body).json()
    # docs/medplum.md: PUTs run in request order so the PUT Condition resolves; the POST ran first and fails
    assert _statuses(r) == ["201", "201", "400"]
    assert r["entry"][1]["resource"]["subject"]["display"] == "Jane Doe"


def test_target_batch_conflict_fault_gives_409_entries(target: TargetSandbox) -> None:
    target.faults.set_conflicts(1.0)
    with fhir_client(target) as c:
        r = c.post(
            "", json=batch(conditional_put_entry(patient("c1")), conditional_put_entry(patient("c2")))
        ).json()
    assert _statuses(r) == ["409", "409"]
    oo = r["entry"][0]["response"]["outcome"]
    assert oo["id"] == "conflict"
    assert oo["issue"][0]["details"] == {
        "coding": [{"code": "40001"}],
        "text": "could not serialize access due to read/write dependencies among transactions",
    }
    assert target.count("Patient") == 0  # a conflicted entry wrote nothing: safe to retry


def test_target_batch_conflict_rate_is_seeded_share(target: TargetSandbox) -> None:
    target.faults.set_conflicts(0.25, seed=7)
    with fhir_client(target) as c:
        r = c.post("", json=batch(*(conditional_put_entry(patient(f"s{i}")) for i in range(200)))).json()
    conflicts = _statuses(r).count("409")
    assert 20 < conflicts < 80
    assert target.count("Patient") == 200 - conflicts


def test_target_conflicts_only_concurrent_spares_a_lone_batch(target: TargetSandbox) -> None:
    target.faults.set_conflicts(1.0, only_concurrent=True)
    with fhir_client(target) as c:
        r = c.post("", json=batch(conditional_put_entry(patient("lone")))).json()
    assert _statuses(r) == ["201"]


def test_target_batch_entry_stats_count_statuses(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("", json=batch(conditional_put_entry(patient("st1")), conditional_put_entry(patient("st1"))))
    assert target.stats.entries == {"201": 1, "400": 1}
