"""Per-entry outcome parsing and classification, on the real Medplum response shapes (transcripts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from pfsync.medplum.batch import (
    Entry,
    EntryResult,
    Kind,
    bundle_bytes,
    bundle_size,
    classify,
    is_too_large,
    parse_batch,
)
from pfsync.net.pacing import parse_ratelimit

TRANSCRIPTS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "transcripts" / "medplum"


def transcript(name: str) -> dict[str, Any]:
    path = next(TRANSCRIPTS.glob(f"{name}-*.json"))
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def response_entries(name: str) -> tuple[bytes, int]:
    """The (last) batch-response of a transcript, and its entry count."""
    doc = transcript(name)
    steps = doc.get("steps") or [doc]
    bodies = [s["response"]["body"] for s in steps if "response" in s]
    body = next(b for b in reversed(bodies) if isinstance(b, dict) and b.get("type") == "batch-response")
    return orjson.dumps(body), len(body["entry"])


def put(sid: str = "x", known_vid: str | None = None, url: str = "Patient?identifier=s|x") -> Entry:
    e = Entry("Patient", sid, "PUT", url, b"{}")
    e.known_vid = known_vid
    return e


def test_parse_batch_created_transcript_14() -> None:
    content, n = response_entries("14")
    results = parse_batch(content, n)
    assert [r.status for r in results] == [201, 201, 201]
    assert results[0].mid == "00142fd4-cc4b-42a1-bc7d-9a3193e12684"
    assert results[0].vid == "607fe539-8e4c-4487-9394-3961ee0b6d84"
    assert all(classify(put(), r) is Kind.CREATED for r in results)


def test_parse_batch_noop_repeat_transcript_15_is_unchanged() -> None:
    content, n = response_entries("15")
    first = parse_batch(content, n)[0]
    assert first.status == 200
    assert classify(put(known_vid=first.vid), first) is Kind.UNCHANGED
    assert classify(put(known_vid="other"), first) is Kind.UPDATED
    assert classify(put(known_vid=None), first) is Kind.UPDATED


def test_parse_batch_duplicate_identity_transcript_16_is_retried() -> None:
    content, n = response_entries("16")
    results = parse_batch(content, n)
    assert [r.status for r in results] == [201, 400]
    assert "did not match resolved ID" in (results[1].text or "")
    assert classify(put(), results[1]) is Kind.RETRY


@pytest.mark.parametrize(("name", "text"), [("17", "matched multiple"), ("18", "foo")])
def test_parse_batch_failures_are_quarantined(name: str, text: str) -> None:
    content, n = response_entries(name)
    failed = [r for r in parse_batch(content, n) if r.status == 400]
    assert failed and text in (failed[0].text or "")
    assert classify(put(), failed[0]) is Kind.FAILED


def test_parse_batch_throttled_transcript_28_carries_wait() -> None:
    content, n = response_entries("28")
    results = parse_batch(content, n)
    throttled = [r for r in results if r.status == 429]
    assert throttled and throttled[0].wait == pytest.approx(57.664)
    assert classify(put(), throttled[0]) is Kind.RETRY
    header = transcript("28")["response"]["headers"]["ratelimit"]
    assert "fhirInteractions" in parse_ratelimit(header)


def test_parse_batch_conflict_transcript_30_is_retried() -> None:
    content, n = response_entries("30")
    results = parse_batch(content, n)
    assert [r.status for r in results] == [201, 409, 201]
    assert classify(put(), results[1]) is Kind.RETRY


def test_parse_batch_too_large_transcript_27() -> None:
    response = transcript("27")["response"]
    text = response["body"]["issue"][0]["details"]["text"]
    assert is_too_large(response["status"], text)
    assert is_too_large(413, None)
    assert not is_too_large(400, "Invalid id")


def test_parse_batch_async_results_transcript_39() -> None:
    steps = [s for s in transcript("39")["steps"] if "response" in s]
    bundle = (
        steps[-2]["response"]["body"]
        if steps[-1]["response"]["body"].get("resourceType") != "Bundle"
        else steps[-1]["response"]["body"]
    )
    results = parse_batch(orjson.dumps(bundle), len(bundle["entry"]))
    assert results and all(r.status == 201 and r.mid for r in results)


def test_parse_batch_missing_entries_become_retries() -> None:
    results = parse_batch(b'{"resourceType":"Bundle","entry":[]}', 2)
    assert [r.status for r in results] == [0, 0]
    assert classify(put(), results[0]) is Kind.RETRY
    assert parse_batch(b"not json", 1)[0].status == 0


@pytest.mark.parametrize(
    ("method", "url", "status", "kind"),
    [
        ("DELETE", "Patient/1", 200, Kind.DELETED),
        ("DELETE", "Patient?identifier=s|1", 200, Kind.DELETED),
        ("DELETE", "Patient/1", 410, Kind.DELETED),
        ("DELETE", "Patient?identifier=s|1", 412, Kind.FAILED),
        ("DELETE", "Patient/1", 503, Kind.RETRY),
        ("PUT", "Patient/1", 404, Kind.STALE),
        ("PUT", "Patient/1", 410, Kind.STALE),
        ("PUT", "Patient?identifier=s|1", 412, Kind.FAILED),
        ("POST", "Patient", 201, Kind.CREATED),
        ("POST", "Patient", 500, Kind.RETRY),
        ("PUT", "Patient/1", 422, Kind.FAILED),
    ],
)
def test_classify_table(method: str, url: str, status: int, kind: Kind) -> None:
    assert classify(Entry("Patient", "1", method, url, None), EntryResult(status)) is kind


def test_bundle_bytes_size_matches_formula() -> None:
    entries = [
        Entry("Patient", str(i), "PUT", f"Patient?identifier=s|{i}", b'{"resourceType":"Patient"}')
        for i in range(3)
    ]
    body = bundle_bytes(entries)
    assert len(body) == bundle_size(sum(len(e.encoded()) for e in entries), 3)
    doc = orjson.loads(body)
    assert doc["type"] == "batch" and len(doc["entry"]) == 3
    assert doc["entry"][0]["request"] == {"method": "PUT", "url": "Patient?identifier=s|0"}
