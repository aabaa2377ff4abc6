"""MedplumReader: paging, 429 waits from msBeforeNext, pacing from RateLimit, quota accounting."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from doubles import FakeClock
from pytest_httpx import HTTPXMock

from pfsync.core.errors import HTTPError, TemporaryError
from pfsync.core.settings import HttpSettings
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import RetryPolicy
from pfsync.verify.medplum import MedplumReader

FHIR = "https://medplum.example/fhir/R4/"
SYS = "https://practicefusion.com/fhir/patient-id"


def rl(remaining: int, reset: int = 60) -> dict[str, str]:
    return {"RateLimit": f'"requests";r=59000;t=60, "fhirInteractions";r={remaining};t={reset}'}


def bundle(ids: list[str], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": "x"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids],
        "link": links,
    }


def throttled(ms: int) -> dict[str, Any]:
    diag = orjson.dumps(
        {"_remainingPoints": 0, "_msBeforeNext": ms, "_consumedPoints": 50060, "limit": 50000}
    )
    return {"resourceType": "OperationOutcome", "id": "too-many-requests",
            "issue": [{"severity": "error", "code": "throttled", "diagnostics": diag.decode()}]}  # fmt: skip


def reader(clock: FakeClock, http: HttpSettings | None = None, **kw: Any) -> MedplumReader:
    policy = RetryPolicy.from_settings(http or HttpSettings())
    return MedplumReader(MedplumClient(httpx.Client(), fhir_url=FHIR, clock=clock, policy=policy), **kw)


def test_reader_scan_follows_next_links_and_measures_quota_from_ratelimit(httpx_mock: HTTPXMock) -> None:
    # Medplum writes links with its public base (here another host): followed on our own base.
    httpx_mock.add_response(
        url=f"{FHIR}Patient?identifier=https://practicefusion.com/fhir/patient-id%7C&_count=2&_sort=_lastUpdated",
        json=bundle(["a", "b"], "https://public.example/fhir/R4/Patient?_count=2&_offset=2&identifier=x"),
        headers=rl(49980),
    )
    httpx_mock.add_response(url=f"{FHIR}Patient?_count=2&_offset=2&identifier=x", json=bundle(["c"]),
                            headers=rl(49960))  # fmt: skip
    clock = FakeClock(start=1000.0)
    r = reader(clock, page_size=2)
    pages = [[res["id"] for res in page] for page in r.scan("Patient", SYS)]
    assert pages == [["a", "b"], ["c"]]
    # First request: from the cost table (no earlier header); second: the RateLimit delta.
    assert r.quota_used == 40 and r.stats.requests == 2 and clock.slept == []


def test_reader_waits_ms_before_next_on_429_and_never_fails(httpx_mock: HTTPXMock) -> None:
    url = f"{FHIR}Patient?_id=a&_count=1000&_elements=id"
    for _ in range(8):  # more 429s than the retry policy allows for 5xx: still no failure
        httpx_mock.add_response(url=url, status_code=429, json=throttled(1500), headers=rl(0, 2))
    httpx_mock.add_response(url=url, json=bundle(["a"]), headers=rl(49980))
    clock = FakeClock(start=1000.0)
    r = reader(clock)
    assert [res["id"] for res in r.by_ids("Patient", ["a"])] == ["a"]
    assert r.stats.throttled == 8
    assert sum(clock.slept) >= 8 * 1.5  # each 429 waited its msBeforeNext (there is no Retry-After)


def test_reader_gives_up_on_429_only_past_max_throttle_wait(httpx_mock: HTTPXMock) -> None:
    url = f"{FHIR}Patient?_id=a&_count=1000&_elements=id"
    httpx_mock.add_response(url=url, status_code=429, json=throttled(60_000), headers=rl(0), is_reusable=True)
    r = reader(FakeClock(start=1000.0), max_throttle_wait=300.0)
    with pytest.raises(TemporaryError, match="429"):
        list(r.by_ids("Patient", ["a"]))


def test_reader_paces_when_the_enforced_quota_is_spent(httpx_mock: HTTPXMock) -> None:
    url = f"{FHIR}Patient?_id=a&_count=1000&_elements=id"
    # A 429 proves the quota is enforced; the next answer leaves 10 points, less than a search.
    httpx_mock.add_response(url=url, status_code=429, json=throttled(100), headers=rl(0, 1))
    httpx_mock.add_response(url=url, json=bundle(["a"]), headers=rl(10, 30))
    httpx_mock.add_response(url=url, json=bundle(["a"]), headers=rl(49980, 60))
    clock = FakeClock(start=1000.0)
    r = reader(clock)
    list(r.by_ids("Patient", ["a"]))
    assert r.stats.throttled == 1
    list(r.by_ids("Patient", ["a"]))  # waits for the window instead of getting another 429
    assert r.stats.throttled == 1
    assert clock.slept[-1] >= 30


def test_reader_quota_off_project_at_r0_is_not_throttling(httpx_mock: HTTPXMock) -> None:
    # docs/medplum.md: a quota-off project counts down to r=0 and refuses nothing.
    url = f"{FHIR}Patient?_id=a&_count=1000&_elements=id"
    httpx_mock.add_response(url=url, json=bundle(["a"]), headers=rl(0, 50), is_reusable=True)
    clock = FakeClock(start=1000.0)
    r = reader(clock)
    for _ in range(3):
        list(r.by_ids("Patient", ["a"]))
    assert clock.slept == [] and r.quota_used == 60  # no delta at r=0: the cost table counts


def test_reader_retries_5xx_then_raises_http_error(httpx_mock: HTTPXMock) -> None:
    url = f"{FHIR}Patient?_id=a&_count=1000&_elements=id"
    httpx_mock.add_response(url=url, status_code=503, is_reusable=True)

    r = reader(FakeClock(start=1000.0), http=HttpSettings(retries=2))
    with pytest.raises(HTTPError):
        list(r.by_ids("Patient", ["a"]))
    assert r.stats.requests == 3


def test_reader_find_batches_identifiers_and_escapes_commas(httpx_mock: HTTPXMock) -> None:
    sids = [f"id-{i}" for i in range(150)] + ["a,b"]
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        value = request.url.params["identifier"]
        seen.append(value)
        ids = [part.split("|", 1)[1] for part in value.replace("\\,", "\0").split(",")]
        entries = [{"resource": {"resourceType": "Patient", "id": f"m-{v}",
                                 "identifier": [{"system": SYS, "value": v.replace("\0", ",")}]}}
                   for v in ids if v in ("id-3", "a\0b")]  # fmt: skip
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries},
                              headers=rl(40000))  # fmt: skip

    httpx_mock.add_callback(answer, is_reusable=True)
    r = reader(FakeClock(start=1000.0))
    found = r.find("Patient", SYS, sids)
    assert len(seen) == 2  # 151 identifiers: 100 + 51, 20 points each
    assert [f.mid for f in found["id-3"]] == ["m-id-3"] and [f.mid for f in found["a,b"]] == ["m-a\0b"]
    assert "a\\,b" in seen[1]
    assert found["id-4"] == []


def test_reader_delete_treats_gone_as_done(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(method="DELETE", url=f"{FHIR}Patient/x", status_code=410, headers=rl(49900))
    httpx_mock.add_response(
        method="DELETE", url=f"{FHIR}Patient/y", status_code=200, json={}, headers=rl(49800)
    )
    httpx_mock.add_response(
        method="DELETE", url=f"{FHIR}Patient/z", status_code=403, json={}, headers=rl(49700)
    )
    r = reader(FakeClock(start=1000.0))
    r.delete("Patient", "x")
    r.delete("Patient", "y")
    with pytest.raises(HTTPError):
        r.delete("Patient", "z")
    # The first write is estimated (the loader's pacer: 140), the next ones measured (100 each).
    assert r.quota_used == 140 + 100 + 100


def test_reader_first_version_time_is_the_earliest_in_history(httpx_mock: HTTPXMock) -> None:
    history = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Patient", "id": "x", "meta": {"lastUpdated": "2026-11-25T12:49:00.966Z"}}},
        {"resource": {"resourceType": "Patient", "id": "x", "meta": {"lastUpdated": "2026-11-25T12:49:00.955Z"}}},
    ]}  # fmt: skip
    httpx_mock.add_response(url=f"{FHIR}Patient/x/_history?_count=1000", json=history)
    assert reader(FakeClock(start=1000.0)).first_version_time("Patient", "x") == "2026-11-25T12:49:00.955Z"
