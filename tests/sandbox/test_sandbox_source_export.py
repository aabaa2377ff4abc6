"""Source sandbox: kick-off, status, files, delete, _since/_type/_typeFilter, groups, reads, control API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from source_fixtures import export_and_wait, kickoff_headers, read_ndjson, source_token

from pfsync.sandbox.source.server import SourceSandbox

pytestmark = pytest.mark.integration
PATIENT = "25b0b189-bc53-4025-af86-9038ee1b8d20"  # first patient of synthea-small


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in manifest["output"]:
        out[entry["type"]] = out.get(entry["type"], 0) + entry["count"]
    return out


def test_base_url_has_pf_shape(source: SourceSandbox) -> None:
    assert source.base_url() == f"{source.server_url}/fhir/r4/v1/{source.practices[0]}"
    assert source.token_url() == source.base_url() + "/token"


def test_kickoff_patient_pf_status_url_and_manifest(source: SourceSandbox) -> None:
    token = source_token(source)
    resp = httpx.get(source.base_url() + "/Patient/$export", headers=kickoff_headers(token))
    assert resp.status_code == 202
    # docs/practice-fusion.md: Content-Location {Base}/Export/{guid}
    assert resp.headers["content-location"].startswith(source.base_url() + "/Export/")
    _, manifest = export_and_wait(source, token)
    assert manifest["requiresAccessToken"] is True and manifest["error"] == [] and manifest["deleted"] == []
    assert manifest["request"] == source.base_url() + "/Patient/$export"
    counts = _counts(manifest)
    assert counts["Patient"] == 17 and counts["Observation"] == 2339
    assert "Practitioner" not in counts and "Organization" not in counts  # not in a patient compartment
    for entry in manifest["output"]:
        assert entry["url"].startswith(f"{source.base_url()}/Binary/export/")  # docs/practice-fusion.md files


def test_status_polls_are_202_without_body_until_done(source: SourceSandbox) -> None:
    source.faults.slow_export(polls=2)
    token = source_token(source)
    url = httpx.get(source.base_url() + "/Patient/$export", headers=kickoff_headers(token)).headers[
        "content-location"
    ]
    first = httpx.get(url, headers=_auth(token))
    assert first.status_code == 202 and first.content == b"" and "x-progress" in first.headers
    httpx.get(url, headers=_auth(token))
    done = httpx.get(url, headers=_auth(token))
    assert done.status_code == 200 and "expires" in done.headers


def test_status_plain_202_has_no_progress_headers(
    source: SourceSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pfsync.sandbox.source import export as source_export

    release = __import__("threading").Event()
    real = source_export.run_job
    monkeypatch.setattr(source_export, "run_job", lambda *a: (release.wait(5), real(*a)))
    token = source_token(source)
    url = httpx.get(source.base_url() + "/Patient/$export", headers=kickoff_headers(token)).headers[
        "content-location"
    ]
    resp = httpx.get(url, headers=_auth(token))
    release.set()
    # docs/practice-fusion.md: 202 with no body and no Retry-After / X-Progress
    assert resp.status_code == 202 and resp.content == b""
    assert "retry-after" not in resp.headers and "x-progress" not in resp.headers


def test_files_split_by_resources_per_file(source: SourceSandbox) -> None:
    _, manifest = export_and_wait(source, source_token(source), params={"_type": "Observation"})
    files = [e for e in manifest["output"] if e["type"] == "Observation"]
    assert [e["count"] for e in files] == [1000, 1000, 339]  # the fixture uses 1,000 per file
    assert [e["url"].rsplit("/", 1)[1] for e in files] == ["1", "2", "3"]


def test_file_download_ndjson_needs_token(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    url = manifest["output"][0]["url"]
    assert httpx.get(url).status_code == 401
    resp = httpx.get(url, headers=_auth(token))
    assert resp.headers["content-type"] == "application/fhir+ndjson"
    lines = resp.content.splitlines()
    assert len(lines) == 17 and resp.content.endswith(b"\n")
    assert all(orjson.loads(line)["resourceType"] == "Patient" for line in lines)


def test_file_range_request_resumes(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    url = manifest["output"][0]["url"]
    full = httpx.get(url, headers=_auth(token)).content
    part = httpx.get(url, headers={**_auth(token), "Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == full[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(full) - 1}/{len(full)}"
    assert httpx.get(url, headers={**_auth(token), "Range": f"bytes={len(full)}-"}).status_code == 416


def test_delete_export_then_status_and_files_404(source: SourceSandbox) -> None:
    token = source_token(source)
    status_url, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    # docs/bulk-data.md, recorded case 40
    assert httpx.delete(status_url, headers=_auth(token)).status_code == 202
    assert httpx.get(status_url, headers=_auth(token)).status_code == 404
    assert httpx.get(manifest["output"][0]["url"], headers=_auth(token)).status_code == 404


def test_job_expiry_gives_404(source: SourceSandbox) -> None:
    token = source_token(source)
    status_url, _ = export_and_wait(source, token, params={"_type": "Patient"})
    source.configure(job_ttl=0)
    assert httpx.get(status_url, headers=_auth(token)).status_code == 404


def test_since_returns_only_changes_after_transaction_time(source: SourceSandbox) -> None:
    token = source_token(source)
    _, first = export_and_wait(source, token)
    patient = orjson.loads(httpx.get(f"{source.base_url()}/Patient/{PATIENT}", headers=_auth(token)).content)
    patient["gender"] = "other"
    source.upsert(patient)
    source.delete("Condition", read_first_id(source, token, "Condition"))
    _, second = export_and_wait(source, token, params={"_since": first["transactionTime"]})
    assert _counts(second) == {"Patient": 1}
    changed = read_ndjson(second["output"][0]["url"], token)
    assert changed[0]["gender"] == "other" and changed[0]["meta"]["lastUpdated"] > first["transactionTime"]
    bundles = read_ndjson(second["deleted"][0]["url"], token)
    assert second["deleted"][0]["type"] == "Bundle" and len(bundles) == 1
    entry = bundles[0]["entry"][0]  # docs/bulk-data.md, recorded case 54: one DELETE request per Bundle
    assert bundles[0]["type"] == "transaction" and entry["request"]["method"] == "DELETE"
    assert entry["request"]["url"].startswith("Condition/")
    _, third = export_and_wait(source, token, params={"_since": second["transactionTime"]})
    assert third["output"] == [] and third["deleted"] == []


def read_first_id(source: SourceSandbox, token: str, rtype: str) -> str:
    bundle = httpx.get(f"{source.base_url()}/{rtype}?_count=1", headers=_auth(token)).json()
    return str(bundle["entry"][0]["resource"]["id"])


def test_since_deleted_absent_without_since_and_without_v2(source: SourceSandbox) -> None:
    token = source_token(source)
    source.delete("Patient", PATIENT)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    assert manifest["deleted"] == [] and _counts(manifest)["Patient"] == 16
    source.configure(smart_v2=False)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient", "_since": "2000-01-01"})
    assert "deleted" not in manifest  # docs/practice-fusion.md: no deleted[] documented


def test_since_date_only_and_old_instant_accepted(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient", "_since": "2020-01-01"})
    assert _counts(manifest) == {"Patient": 17}  # loaded without lastUpdated: stamped at load time


@pytest.mark.parametrize("since", ["not-a-date", "2099-01-01T00:00:00Z", "2020-01-01T10:00:00"])
def test_since_malformed_or_future_400(source: SourceSandbox, since: str) -> None:
    resp = httpx.get(source.base_url() + "/Patient/$export", params={"_since": since},
                     headers=kickoff_headers(source_token(source)))  # fmt: skip
    # docs/bulk-data.md, recorded cases 26, 27
    assert resp.status_code == 400 and resp.json()["resourceType"] == "OperationOutcome"


def test_type_param_limits_output(source: SourceSandbox) -> None:
    _, manifest = export_and_wait(source, source_token(source), params={"_type": "Patient,Condition"})
    assert set(_counts(manifest)) == {"Patient", "Condition"}


@pytest.mark.parametrize(
    ("flt", "field", "expect"),
    [
        ("Observation?category=laboratory", "category", "laboratory"),
        ("Condition?clinical-status=active", "clinicalStatus", "active"),
    ],
)
def test_type_filter_token_params(source: SourceSandbox, flt: str, field: str, expect: str) -> None:
    token = source_token(source)
    rtype = flt.split("?")[0]
    _, manifest = export_and_wait(source, token, params={"_type": rtype, "_typeFilter": flt})
    rows = [r for e in manifest["output"] for r in read_ndjson(e["url"], token)]
    _, unfiltered = export_and_wait(source, token, params={"_type": rtype})
    assert 0 < len(rows) < _counts(unfiltered)[rtype]
    for row in rows:
        value = row[field]
        codes = {c["code"] for cc in (value if isinstance(value, list) else [value]) for c in cc["coding"]}
        assert expect in codes


def test_type_filter_unknown_param_400(source: SourceSandbox) -> None:
    resp = httpx.get(source.base_url() + "/Patient/$export", params={"_typeFilter": "Observation?value-quantity=5"},
                     headers=kickoff_headers(source_token(source)))  # fmt: skip
    assert resp.status_code == 400


@pytest.mark.parametrize("fmt", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_output_format_ndjson_variants_accepted(source: SourceSandbox, fmt: str) -> None:
    resp = httpx.get(source.base_url() + "/Patient/$export", params={"_outputFormat": fmt, "_type": "Patient"},
                     headers=kickoff_headers(source_token(source)))  # fmt: skip
    assert resp.status_code == 202


def test_kickoff_post_parameters(source: SourceSandbox) -> None:
    token = source_token(source)
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"}, {"name": "_type", "valueString": "Condition"},
        {"name": "_since", "valueInstant": "2010-01-01T00:00:00Z"}]}  # fmt: skip
    resp = httpx.post(source.base_url() + "/Patient/$export", json=body, headers=kickoff_headers(token))
    assert resp.status_code == 202
    manifest = httpx.get(resp.headers["content-location"], headers=_auth(token)).json()
    assert set(_counts(manifest)) == {"Patient", "Condition"}


def test_kickoff_type_outside_granted_scope_403(source: SourceSandbox) -> None:
    token = source_token(source, scope="system/Patient.read")
    resp = httpx.get(source.base_url() + "/Patient/$export", params={"_type": "Observation"},
                     headers=kickoff_headers(token))  # fmt: skip
    assert resp.status_code == 403
    _, manifest = export_and_wait(source, token)
    assert set(_counts(manifest)) == {"Patient"}  # without _type: only granted types


def test_system_export_off_by_default_then_on(source: SourceSandbox) -> None:
    token = source_token(source)
    resp = httpx.get(source.base_url() + "/$export", headers=kickoff_headers(token))
    # docs/practice-fusion.md
    assert resp.status_code == 404 and resp.json()["resourceType"] == "OperationOutcome"
    source.configure(system_export=True)
    _, manifest = export_and_wait(source, token, path="/$export")
    assert _counts(manifest)["Practitioner"] == 36  # system level includes non-compartment types


def test_group_list_and_group_export(source: SourceSandbox) -> None:
    token = source_token(source)
    bundle = httpx.get(source.base_url() + "/Group", headers=_auth(token)).json()
    groups = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    # docs/bulk-data.md, recorded case 23: quantity, no member
    assert bundle["type"] == "searchset" and len(groups) >= 2
    assert (
        groups["bulk-data-testing-group"]["quantity"] == 9
        and "member" not in groups["bulk-data-testing-group"]
    )
    _, manifest = export_and_wait(source, token, path="/Group/bulk-data-testing-group/$export")
    assert _counts(manifest)["Patient"] == 9
    assert (
        httpx.get(source.base_url() + "/Group/nope/$export", headers=kickoff_headers(token)).status_code
        == 404
    )


def test_add_to_group_changes_group_export(source: SourceSandbox) -> None:
    token = source_token(source)
    source.add_to_group("new-group", [PATIENT])
    _, manifest = export_and_wait(source, token, path="/Group/new-group/$export", params={"_type": "Patient"})
    assert _counts(manifest) == {"Patient": 1}
    assert all(size <= 1000 for _, _, size in source.groups())


def test_reads_by_id_and_id_search(source: SourceSandbox) -> None:
    token = source_token(source)
    resp = httpx.get(f"{source.base_url()}/Patient/{PATIENT}", headers=_auth(token))
    assert resp.status_code == 200 and resp.json()["id"] == PATIENT
    other = read_first_id(source, token, "Condition")
    bundle = httpx.get(
        f"{source.base_url()}/Patient", params={"_id": f"{PATIENT},nope"}, headers=_auth(token)
    ).json()
    assert bundle["type"] == "searchset" and [e["resource"]["id"] for e in bundle["entry"]] == [PATIENT]
    assert httpx.get(f"{source.base_url()}/Condition/{other}", headers=_auth(token)).status_code == 200
    assert httpx.get(f"{source.base_url()}/Patient/nope", headers=_auth(token)).status_code == 404


def test_upsert_new_resource_and_reset_restores(source: SourceSandbox) -> None:
    token = source_token(source)
    source.upsert({"resourceType": "Patient", "id": "new-one", "gender": "female"})
    source.delete("Patient", PATIENT)
    assert httpx.get(f"{source.base_url()}/Patient/new-one", headers=_auth(token)).status_code == 200
    source.reset()
    token = source_token(source)
    assert httpx.get(f"{source.base_url()}/Patient/new-one", headers=_auth(token)).status_code == 404
    assert httpx.get(f"{source.base_url()}/Patient/{PATIENT}", headers=_auth(token)).status_code == 200


def test_attachments_rewritten_and_served(source: SourceSandbox) -> None:
    token = source_token(source)
    doc = source.upsert({"resourceType": "DocumentReference", "id": "doc-1", "status": "current",
                         "subject": {"reference": f"Patient/{PATIENT}"},
                         "content": [{"attachment": {"contentType": "application/pdf", "size": 2048,
                                      "url": "http://127.0.0.1:9443/eyJ9/fhir/attachments/document.pdf"}}]})  # fmt: skip
    url = doc["content"][0]["attachment"]["url"]
    assert url == source.base_url() + "/attachments/document.pdf"
    assert httpx.get(url).status_code == 401
    resp = httpx.get(url, headers=_auth(token))
    assert resp.status_code == 200 and len(resp.content) == 2048
    assert resp.headers["content-type"] == "application/pdf"


def test_several_practices_have_own_data_tokens_and_groups() -> None:
    with SourceSandbox(practices=["practice-a", "practice-b"]) as sandbox:
        ta, tb = source_token(sandbox, practice="practice-a"), source_token(sandbox, practice="practice-b")
        _, ma = export_and_wait(sandbox, ta, params={"_type": "Patient"}, practice="practice-a")
        _, mb = export_and_wait(sandbox, tb, params={"_type": "Patient"}, practice="practice-b")
        ids_a = {r["id"] for e in ma["output"] for r in read_ndjson(e["url"], ta)}
        ids_b = {r["id"] for e in mb["output"] for r in read_ndjson(e["url"], tb)}
        assert ids_a and ids_b and not ids_a & ids_b
        assert sandbox.groups("practice-a") and sandbox.groups("practice-b")


def test_control_api_drives_sandbox(source: SourceSandbox) -> None:
    ctl = source.server_url + "/_sandbox"
    config = httpx.get(ctl + "/config").json()
    assert config["bases"][source.practices[0]] == source.base_url()
    patient = {"resourceType": "Patient", "id": "ctl-patient", "gender": "male"}
    stored = httpx.post(ctl + "/resources", json=patient).json()
    assert stored["meta"]["lastUpdated"]
    assert httpx.delete(ctl + "/resources/Patient/ctl-patient").json() == {"deleted": True}
    assert httpx.post(ctl + "/groups/ctl-group/members", json={"patients": [PATIENT]}).status_code == 200
    httpx.post(ctl + "/faults", json={"name": "server_error", "where": "kickoff", "status": 503})
    token = source_token(source)
    assert httpx.get(source.base_url() + "/Group/ctl-group/$export",
                     headers=kickoff_headers(token)).status_code == 503  # fmt: skip
    stats = httpx.get(ctl + "/stats").json()
    assert stats["counts"]["kickoff"] == 1 and stats["counts"]["token"] == 1
    httpx.post(ctl + "/config", json={"token_lifetime": 7})
    assert httpx.post(source.token_url(), data={"grant_type": "client_credentials", "scope": "system/*.read"},
                      auth=("pfsync-sandbox", "sandbox-secret")).json()["expires_in"] == 7  # fmt: skip
    assert httpx.post(ctl + "/reset").status_code == 200
    assert source.faults.active() == [] and source.auth_config.token_lifetime == 300


def test_stats_record_authorization_per_url(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    read_ndjson(manifest["output"][0]["url"], token)
    assert source.stats.count("download") == 1
    assert source.stats.authorization_sent(manifest["output"][0]["url"])


def test_transaction_time_is_recent_instant(source: SourceSandbox) -> None:
    _, manifest = export_and_wait(source, source_token(source), params={"_type": "Patient"})
    stamp = datetime.fromisoformat(manifest["transactionTime"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)
