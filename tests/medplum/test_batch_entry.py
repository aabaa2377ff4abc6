"""Batch entries: an update by id carries its id in the body; other requests send the body as it is
(docs/medplum.md, "Updates by id"; recorded cases 44, 45, 09)."""

from __future__ import annotations

import orjson
import pytest

from pfsync.medplum.batch import Entry, bundle_bytes


def _entry(method: str, url: str, body: dict[str, object] | None) -> Entry:
    return Entry("Patient", "src-1", method, url, orjson.dumps(body) if body is not None else None)


def _sent(entry: Entry) -> dict[str, object]:
    bundle = orjson.loads(bundle_bytes([entry]))
    return bundle["entry"][0]  # type: ignore[no-any-return]


def test_entry_update_by_id_puts_the_medplum_id_in_the_body() -> None:
    sent = _sent(_entry("PUT", "Patient/abc", {"resourceType": "Patient", "gender": "female"}))
    assert sent["resource"] == {"resourceType": "Patient", "id": "abc", "gender": "female"}
    assert sent["request"] == {"method": "PUT", "url": "Patient/abc"}


def test_entry_update_by_id_replaces_a_stale_body_id() -> None:
    sent = _sent(_entry("PUT", "Patient/new", {"resourceType": "Patient", "id": "old"}))
    assert sent["resource"] == {"resourceType": "Patient", "id": "new"}


@pytest.mark.parametrize(
    ("method", "url"),
    [("POST", "Patient"), ("PUT", "Patient?identifier=sys%7Cv")],
)
def test_entry_create_and_conditional_put_send_the_body_unchanged(method: str, url: str) -> None:
    body: dict[str, object] = {"resourceType": "Patient", "gender": "female"}
    assert _sent(_entry(method, url, body))["resource"] == body


def test_entry_retarget_to_update_by_id_re_encodes_with_the_id() -> None:
    entry = _entry("POST", "Patient", {"resourceType": "Patient"})
    assert "id" not in _sent(entry)["resource"]  # type: ignore[operator]
    entry.retarget("PUT", "Patient/m1")
    assert _sent(entry)["resource"] == {"resourceType": "Patient", "id": "m1"}
