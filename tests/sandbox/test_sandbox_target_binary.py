"""Target sandbox: Binary, presigned attachment URLs, async batches and body limits
(docs/medplum.md "Binary and attachments", "Size limits"; recorded cases 27, 38, 39, 43)."""

from __future__ import annotations

import time

import httpx
from target_fixtures import batch, conditional_put_entry, fhir_client, patient

from pfsync.sandbox.target.server import TargetSandbox

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def test_target_binary_upload_raw_and_fhir_reads(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        created = c.post("Binary", content=PDF, headers={"Content-Type": "application/pdf"})
        bid = created.json()["id"]
        as_json = c.get(f"Binary/{bid}", headers={"Accept": "application/fhir+json"})
        raw = c.get(f"Binary/{bid}", headers={"Accept": "*/*"})
    assert created.status_code == 201 and "location" in created.headers
    assert created.json()["url"].startswith(f"{target.base_url}storage/{bid}/")
    assert set(as_json.json()) == {"resourceType", "id", "contentType", "meta"}  # no data, no url
    assert raw.headers["content-type"] == "application/pdf" and raw.content == PDF


def test_target_documentreference_attachment_is_presigned_and_served(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        bid = c.post("Binary", content=PDF, headers={"Content-Type": "application/pdf"}).json()["id"]
        doc = {
            "resourceType": "DocumentReference",
            "status": "current",
            "content": [{"attachment": {"contentType": "application/pdf", "url": f"Binary/{bid}"}}],
        }
        created = c.post("DocumentReference", json=doc).json()
        read = c.get(f"DocumentReference/{created['id']}").json()
        # the stored url stays Binary/<id>: re-sending the same document is a no-op
        again = c.put(f"DocumentReference/{created['id']}", json={**doc, "id": created["id"]}).json()
    url = read["content"][0]["attachment"]["url"]
    assert url.startswith(f"{target.base_url}storage/{bid}/") and "Expires=" in url and "Signature=" in url
    assert created["content"][0]["attachment"]["url"].startswith(f"{target.base_url}storage/")
    assert again["meta"]["versionId"] == created["meta"]["versionId"]
    assert httpx.get(url).content == PDF
    assert httpx.get(url.replace("Signature=", "Signature=x")).status_code == 403


def test_target_body_over_limit_is_400_file_too_large(target: TargetSandbox) -> None:
    target.max_json_size = 2_000
    body = batch(*(conditional_put_entry(patient(f"big-{i}")) for i in range(20)))
    with fhir_client(target) as c:
        r = c.post("", json=body)
        small = c.post("", json=batch(conditional_put_entry(patient("small"))))
    assert r.status_code == 400
    assert r.json()["issue"][0] == {
        "severity": "error",
        "code": "invalid",
        "details": {"text": "File too large"},
    }
    assert small.status_code == 200 and target.count("Patient") == 1


def test_target_body_limit_is_exactly_1_mib(target: TargetSandbox) -> None:
    def sized(n: int) -> bytes:
        raw = b'{"resourceType": "Bundle", "type": "batch", "entry": []}'
        return raw[:-1] + b" " * (n - len(raw)) + raw[-1:]

    with fhir_client(target) as c:
        assert c.post("", content=sized(1_048_576)).status_code == 200
        assert c.post("", content=sized(1_048_577)).status_code == 400


def _poll(c: httpx.Client, url: str) -> httpx.Response:
    for _ in range(400):
        r = c.get(url)
        if r.status_code != 202:
            return r
        assert r.json()["status"] == "accepted"
        time.sleep(0.05)
    raise AssertionError("async job never finished")


def test_target_async_batch_job_and_result_binary(target: TargetSandbox) -> None:
    body = batch(*(conditional_put_entry(patient(f"async-{i}")) for i in range(50)))
    with fhir_client(target) as c:
        r = c.post("", json=body, headers={"Prefer": "respond-async"})
        status_url = r.headers["content-location"]
        done = _poll(c, status_url)
        ref = done.json()["output"]["parameter"][0]["valueReference"]["reference"]
        result = c.get(ref, headers={"Accept": "*/*"}).json()
    assert (
        r.status_code == 202
        and status_url.startswith(f"{target.fhir_url}job/")
        and status_url.endswith("/status")
    )
    assert r.json()["issue"][0]["diagnostics"] == status_url
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert ref.startswith("Binary/")
    assert result["type"] == "batch-response" and len(result["entry"]) == 50
    meta = result["entry"][0]["resource"]["meta"]
    assert set(meta) >= {"author", "project", "compartment"}
    assert target.count("Patient") == 50


def test_target_async_batch_size_limit_is_configurable(target: TargetSandbox) -> None:
    target.max_json_size = 500
    target.max_batch_size = 100_000
    body = batch(*(conditional_put_entry(patient(f"asz-{i}")) for i in range(10)))
    try:
        with fhir_client(target) as c:
            assert c.post("", json=body).status_code == 400  # synchronous: over max_json_size
            r = c.post("", json=body, headers={"Prefer": "respond-async"})
            assert r.status_code == 202
            _poll(c, r.headers["content-location"])
            target.max_batch_size = 1_000
            assert c.post("", json=body, headers={"Prefer": "respond-async"}).status_code == 400
    finally:
        target.max_batch_size = 50 * 1024 * 1024
