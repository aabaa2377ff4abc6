"""Target sandbox: ids, conditional PUT, no-ops, ETag/Location, If-Match, delete, history
(docs/medplum.md "Ids and identity", "Conditional update", "Optimistic locking"; recorded cases 08-13, 26, 35, 40-42)."""

from __future__ import annotations

import uuid

from target_fixtures import MRN, fhir_client, patient

from pfsync.sandbox.target.server import TargetSandbox


def test_target_conditional_put_creates_then_noop_then_updates(target: TargetSandbox) -> None:
    url = f"Patient?identifier={MRN}|cput-1"
    with fhir_client(target) as c:
        first = c.put(url, json=patient("cput-1"))
        again = c.put(url, json=patient("cput-1"))
        changed = c.put(url, json=patient("cput-1", given="Janet"))
        history = c.get(f"Patient/{first.json()['id']}/_history").json()
    assert first.status_code == 201
    assert first.headers["location"] == f"{target.fhir_url}Patient/{first.json()['id']}"
    vid = first.json()["meta"]["versionId"]
    assert first.headers["etag"] == f'W/"{vid}"' and "last-modified" in first.headers
    # docs/medplum.md, recorded case 08: identical repeat is a true no-op (same versionId, no Location, no new version)
    assert again.status_code == 200 and "location" not in again.headers
    assert again.json()["meta"] == first.json()["meta"]
    assert changed.status_code == 200 and changed.json()["meta"]["versionId"] != vid
    assert history["total"] == 2
    assert target.stats.writes == 2 and target.stats.noops == 1


def test_target_noop_ignores_foreign_meta_version_and_timestamp(target: TargetSandbox) -> None:
    url = f"Patient?identifier={MRN}|meta-1"
    with fhir_client(target) as c:
        first = c.put(url, json=patient("meta-1")).json()
        foreign = patient("meta-1", meta={"versionId": "99", "lastUpdated": "1999-01-01T00:00:00.000Z"})
        again = c.put(url, json=foreign).json()
    # docs/medplum.md, recorded case 26: overwritten, not a version check
    assert again["meta"] == first["meta"]


def test_target_post_ignores_body_id_and_overwrites_meta(target: TargetSandbox) -> None:
    body = patient(
        "post-1", id="not-kept", meta={"versionId": "42", "lastUpdated": "2001-02-03T04:05:06.000Z"}
    )
    with fhir_client(target) as c:
        r = c.post("Patient", json=body)
    assert r.status_code == 201
    res = r.json()
    assert res["id"] != "not-kept" and uuid.UUID(res["id"])
    assert res["meta"]["versionId"] != "42" and not res["meta"]["lastUpdated"].startswith("2001")


def test_target_conditional_put_with_body_id_and_no_match_is_400(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        r = c.put(f"Patient?identifier={MRN}|id-1", json=patient("id-1", id=str(uuid.uuid4())))
    assert r.status_code == 400
    assert (
        r.json()["issue"][0]["details"]["text"] == "Cannot perform create as update with client-assigned ID"
    )
    assert target.count("Patient") == 0


def test_target_conditional_put_multiple_matches_is_412(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("dup"))
        c.post("Patient", json=patient("dup"))
        r = c.put(f"Patient?identifier={MRN}|dup", json=patient("dup", given="Three"))
    assert r.status_code == 412
    assert r.json()["id"] == "multiple-matches"
    assert r.json()["issue"][0]["details"]["text"] == "Multiple resources found matching condition"


def test_target_put_unknown_uuid_is_404_and_non_uuid_is_invalid_id(target: TargetSandbox) -> None:
    rid = str(uuid.uuid4())
    with fhir_client(target) as c:
        missing = c.put(f"Patient/{rid}", json=patient("x", id=rid))
        bad = c.put("Patient/not-a-uuid", json=patient("x", id="not-a-uuid"))
        read_bad = c.get("Patient/not-a-uuid")
    assert missing.status_code == 404 and missing.json()["issue"][0]["details"]["text"] == "Not found"
    assert bad.status_code == 400 and bad.json()["issue"][0]["details"]["text"] == "Invalid id"
    # docs/medplum.md, recorded case 13: a read of a non-UUID id is 404, not 400
    assert read_bad.status_code == 404


def test_target_if_match_only_quoted_values_count(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        created = c.post("Patient", json=patient("ifm")).json()
        rid, stale = created["id"], created["meta"]["versionId"]

        def put(if_match: str, given: str) -> int:
            body = patient("ifm", given=given, id=rid)
            return c.put(f"Patient/{rid}", json=body, headers={"If-Match": if_match}).status_code

        assert put(f'W/"{stale}"', "Two") == 200
        assert put(f'W/"{stale}"', "Three") == 412
        assert put(stale, "Four") == 200  # unquoted: ignored
        assert put(f"W/{stale}", "Five") == 200  # W/ without quotes: ignored
        current = c.get(f"Patient/{rid}").json()["meta"]["versionId"]
        assert put(f'"{current}"', "Six") == 200
        assert put(f'"{stale}"', "Seven") == 412


def test_target_delete_then_read_is_gone_and_history_has_410(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        rid = c.post("Patient", json=patient("del")).json()["id"]
        first = c.delete(f"Patient/{rid}")
        read = c.get(f"Patient/{rid}")
        second = c.delete(f"Patient/{rid}")
        history = c.get(f"Patient/{rid}/_history").json()
    assert first.status_code == 200 and first.json()["issue"][0]["details"]["text"] == "All OK"
    assert read.status_code == 410 and read.json()["id"] == "gone"
    assert second.status_code == 200
    assert [e["response"]["status"] for e in history["entry"]] == ["410", "200"]
    assert history["entry"][0]["response"]["outcome"]["issue"][0]["details"]["text"].startswith("Deleted on ")
    assert target.count("Patient") == 0


def test_target_conditional_delete_one_none_and_many(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("cdel"))
        assert c.delete(f"Patient?identifier={MRN}|cdel").status_code == 200
        assert c.delete(f"Patient?identifier={MRN}|cdel").status_code == 200  # no match: 200 too
        c.post("Patient", json=patient("cdel-multi"))
        c.post("Patient", json=patient("cdel-multi"))
        r = c.delete(f"Patient?identifier={MRN}|cdel-multi")
    assert r.status_code == 412 and r.json()["id"] == "multiple-matches"
    assert len(target.find_by_identifier("Patient", MRN, "cdel-multi")) == 2


def test_target_history_is_newest_first_with_request_urls(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        created = c.post("Patient", json=patient("hist")).json()
        rid = created["id"]
        updated = c.put(f"Patient/{rid}", json=patient("hist", given="Updated", id=rid)).json()
        history = c.get(f"Patient/{rid}/_history").json()
    assert history["type"] == "history" and history["total"] == 2
    vids = [e["resource"]["meta"]["versionId"] for e in history["entry"]]
    assert vids == [updated["meta"]["versionId"], created["meta"]["versionId"]]
    assert history["entry"][0]["request"] == {"method": "GET", "url": f"Patient/{rid}/_history/{vids[0]}"}


def test_target_conditional_reference_is_resolved_with_display(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        pid = c.post("Patient", json=patient("cref")).json()["id"]
        cond = {
            "resourceType": "Condition",
            "subject": {"reference": f"Patient?identifier={MRN}|cref"},
            "code": {"text": "Example condition"},
        }
        r = c.post("Condition", json=cond)
        missing = c.post(
            "Condition", json={**cond, "subject": {"reference": f"Patient?identifier={MRN}|nope"}}
        )
    assert r.status_code == 201
    assert r.json()["subject"] == {"reference": f"Patient/{pid}", "display": "Jane Doe"}
    assert missing.status_code == 400
    issue = missing.json()["issue"][0]
    assert (
        issue["details"]["text"]
        == f"Conditional reference 'Patient?identifier={MRN}|nope' did not match any resources"
    )
    assert issue["expression"] == ["Condition.subject"]


def test_target_check_references_on_write_rejects_dangling(target: TargetSandbox) -> None:
    cond = {"resourceType": "Condition", "subject": {"reference": f"Patient/{uuid.uuid4()}"}}
    with fhir_client(target) as c:
        assert c.post("Condition", json=cond).status_code == 201  # off by default: accepted silently
        target.check_references_on_write = True
        assert c.post("Condition", json=cond).status_code == 400
        pid = c.post("Patient", json=patient("ref-ok")).json()["id"]
        assert (
            c.post("Condition", json={**cond, "subject": {"reference": f"Patient/{pid}"}}).status_code == 201
        )


def test_target_put_by_id_needs_the_body_to_carry_that_id(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        rid = c.post("Patient", json=patient("putid-1")).json()["id"]
        no_id = c.put(f"Patient/{rid}", json=patient("putid-1", given="NoId"))
        other_id = c.put(
            f"Patient/{rid}", json={**patient("putid-1", given="Other"), "id": str(uuid.uuid4())}
        )
        other_type = c.put(f"Patient/{rid}", json={"resourceType": "Practitioner", "id": rid})
        same_id = c.put(f"Patient/{rid}", json={**patient("putid-1", given="Same"), "id": rid})
        stored = c.get(f"Patient/{rid}").json()
    # docs/medplum.md, recorded case 44: type first, then id; only the matching body is written
    assert no_id.status_code == other_id.status_code == other_type.status_code == 400
    assert no_id.json()["issue"][0]["details"]["text"] == "Incorrect resource ID"
    assert other_id.json()["issue"][0]["details"]["text"] == "Incorrect resource ID"
    assert other_type.json()["issue"][0]["details"]["text"] == "Incorrect resource type"
    assert same_id.status_code == 200 and stored["name"][0]["given"] == ["Same"]


def test_target_post_if_none_exist_creates_once(target: TargetSandbox) -> None:
    headers = {"If-None-Exist": f"identifier={MRN}|ifne-1"}
    with fhir_client(target) as c:
        first = c.post("Patient", json=patient("ifne-1"), headers=headers)
        again = c.post("Patient", json=patient("ifne-1", given="Again"), headers=headers)
        found = c.get(f"Patient?identifier={MRN}|ifne-1").json()
    # docs/medplum.md, recorded case 49: 201, then 200 with the existing resource and no second copy
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["name"] == first.json()["name"]
    assert "location" not in again.headers
    assert len(found["entry"]) == 1
