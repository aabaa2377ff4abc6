"""The seeded data generator: counts, determinism, internal consistency, strict-validator friendliness."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson

from pfsync.sandbox.source.datagen import generate, iter_resources
from pfsync.sandbox.source.server import SourceSandbox


def _walk(value: Any, found: list[str], refs: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference":
                refs.append(item)
            _walk(item, found, refs)
    elif isinstance(value, list):
        if not value:
            found.append("empty list")
        for item in value:
            _walk(item, found, refs)
    elif value is None or value == "":
        found.append(repr(value))


def test_datagen_writes_counts_and_about_100_per_patient(tmp_path: Path) -> None:
    counts = generate(tmp_path, patients=5, seed=3)
    assert counts["Patient"] == 5 and counts["Organization"] == 3 and counts["Location"] == 2
    per_patient = (sum(counts.values()) - 10) / 5
    assert 80 <= per_patient <= 130
    for rtype, count in counts.items():
        lines = (tmp_path / f"{rtype}.ndjson").read_bytes().splitlines()
        assert len(lines) == count and all(orjson.loads(x)["resourceType"] == rtype for x in lines)


def test_datagen_same_seed_same_data_other_seed_other_ids() -> None:
    first = [r["id"] for r in iter_resources(2, seed=9)]
    assert first == [r["id"] for r in iter_resources(2, seed=9)]
    assert not set(first) & {r["id"] for r in iter_resources(2, seed=10)}


def test_datagen_references_resolve_and_no_empty_values() -> None:
    resources = list(iter_resources(3, seed=1))
    ids = {r["id"]: r["resourceType"] for r in resources}
    problems: list[str] = []
    refs: list[str] = []
    for resource in resources:
        _walk(resource, problems, refs)
    assert problems == []  # strict Medplum validation: no nulls, empty strings or empty arrays
    assert any(ref.startswith("urn:uuid:") for ref in refs)  # Synthea-like mixed forms
    for ref in refs:
        rid = ref.removeprefix("urn:uuid:").split("/")[-1]
        assert rid in ids, ref
        if "/" in ref and not ref.startswith("urn:"):
            assert ids[rid] == ref.split("/")[0]


def test_datagen_dates_are_valid() -> None:
    for resource in iter_resources(2, seed=4):
        if "birthDate" in resource:
            date.fromisoformat(resource["birthDate"])
        for key in (
            "effectiveDateTime",
            "authoredOn",
            "occurrenceDateTime",
            "onsetDateTime",
            "date",
            "issued",
        ):
            if key in resource:
                datetime.fromisoformat(resource[key].replace("Z", "+00:00"))


def test_datagen_documents_have_inline_and_url_attachments() -> None:
    attachments = [c["attachment"] for r in iter_resources(10, seed=2) if r["resourceType"] == "DocumentReference"
                   for c in r["content"]]  # fmt: skip
    assert any("data" in a for a in attachments)
    assert any(a.get("url", "").startswith("http://127.0.0.1:9443/Binary/") for a in attachments)


def test_datagen_urls_served_by_sandbox(tmp_path: Path, source_factory: Callable[..., SourceSandbox]) -> None:
    import httpx

    generate(tmp_path, patients=4, seed=5)
    sandbox = source_factory(data_dir=tmp_path)
    token = httpx.post(sandbox.token_url(), data={"grant_type": "client_credentials", "scope": "system/*.read"},
                       auth=("pfsync-sandbox", "sandbox-secret")).json()["access_token"]  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    docs = httpx.get(sandbox.base_url() + "/DocumentReference?_count=100", headers=auth).json()["entry"]
    urls = [
        c["attachment"]["url"] for d in docs for c in d["resource"]["content"] if "url" in c["attachment"]
    ]
    assert urls and all(u.startswith(sandbox.base_url() + "/Binary/") for u in urls)
    resp = httpx.get(urls[0], headers=auth)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/pdf"
