"""Target sandbox: FHIR interaction quota and the RateLimit header (docs/medplum.md "Quotas and 429",
"Quota costs"; docs/medplum.md, recorded cases 28, 29)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from target_fixtures import MRN, batch, conditional_put_entry, fhir_client, patient

from pfsync.sandbox.target.server import TargetSandbox

FHIR_RE = re.compile(r'"fhirInteractions";r=(\d+);t=(\d+)')


def _remaining(r: httpx.Response) -> int:
    m = FHIR_RE.search(r.headers["ratelimit"])
    assert m, r.headers["ratelimit"]
    return int(m.group(1))


@pytest.fixture
def costs(target: TargetSandbox) -> httpx.Client:
    target.add_client("costs", "costs-secret", quota=1_000_000)
    return fhir_client(target, "costs", "costs-secret")


def _cost(c: httpx.Client, method: str, url: str, **kw: object) -> int:
    before = _remaining(c.get("Patient/not-a-uuid"))
    r = c.request(method, url, **kw)  # type: ignore[arg-type]
    return before - _remaining(r)


def test_target_quota_costs_match_measured_values(costs: httpx.Client) -> None:
    c = costs
    pid = c.post("Patient", json=patient("q-base")).json()["id"]
    assert _cost(c, "GET", "Patient/not-a-uuid") == 1
    assert _cost(c, "GET", f"Patient/{pid}") == 1
    assert (
        _cost(c, "GET", "Patient", params={"identifier": ",".join(f"{MRN}|v{i}" for i in range(100))}) == 20
    )
    assert _cost(c, "GET", f"Patient/{pid}/_history") == 10
    assert _cost(c, "POST", "Patient", json=patient("q-post")) == 100
    assert _cost(c, "PUT", f"Patient/{pid}", json=patient("q-base", id=pid)) == 100  # no-op costs the write
    assert _cost(c, "PUT", f"Patient?identifier={MRN}|q-cput", json=patient("q-cput")) == 120
    assert _cost(c, "PUT", f"Patient?identifier={MRN}|q-cput", json=patient("q-cput")) == 120
    two_creates = batch(conditional_put_entry(patient("q-b1")), conditional_put_entry(patient("q-b2")))
    assert _cost(c, "POST", "", json=two_creates) == 280  # 140 per create in a batch
    assert _cost(c, "POST", "", json=two_creates) == 240  # about 120 per match
    cond = {"resourceType": "Condition", "subject": {"reference": f"Patient?identifier={MRN}|q-base"}}
    assert _cost(c, "POST", "Condition", json=cond) == 120  # +20 per conditional reference


def test_target_quota_off_still_counts_down_to_zero_and_refuses_nothing(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        body = batch(*(conditional_put_entry(patient(f"off-{i}")) for i in range(400)))
        r = c.post("", json=body)
        after = c.get("Patient", params={"_count": "1"})
    assert r.status_code == 200 and {e["response"]["status"] for e in r.json()["entry"]} == {"201"}
    assert _remaining(r) == 0 and after.status_code == 200  # 400 x 140 > 50,000, yet nothing refused


def test_target_quota_batch_429_for_the_rest_under_outer_200(target: TargetSandbox) -> None:
    target.add_client("small", "small-secret", quota=1_000)
    with fhir_client(target, "small", "small-secret") as c:
        r = c.post("", json=batch(*(conditional_put_entry(patient(f"qb-{i}")) for i in range(10))))
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    # 10 first-pass searches (200) then 120 per create: 6 fit in 1,000, the 7th and all later get 429
    assert r.status_code == 200 and statuses == ["201"] * 6 + ["429"] * 4
    oo = r.json()["entry"][6]["response"]["outcome"]
    assert oo["id"] == "too-many-requests" and oo["issue"][0]["code"] == "throttled"
    assert target.count("Patient") == 6


def test_target_quota_standalone_429_and_refused_requests_still_add_points(target: TargetSandbox) -> None:
    target.add_client("tiny", "tiny-secret", quota=100)
    with fhir_client(target, "tiny", "tiny-secret") as c:
        assert c.post("Patient", json=patient("t1")).status_code == 201
        first = c.get("Patient")
        second = c.get("Patient")
    assert first.status_code == 429 and "retry-after" not in first.headers
    body = first.json()
    assert body["id"] == "too-many-requests"
    d1 = json.loads(body["issue"][0]["diagnostics"])
    d2 = json.loads(second.json()["issue"][0]["diagnostics"])
    assert list(d1) == ["_remainingPoints", "_msBeforeNext", "_consumedPoints", "_isFirstInDuration", "limit"]
    assert (d1["_consumedPoints"], d2["_consumedPoints"], d1["limit"]) == (120, 140, 100)
    assert _remaining(first) == 0


def test_target_quota_window_resets(target: TargetSandbox) -> None:
    target.add_client("fast", "fast-secret", quota=100, quota_window=0.0)  # every call opens a new window
    with fhir_client(target, "fast", "fast-secret") as c:
        assert c.post("Patient", json=patient("w1")).status_code == 201
        assert c.post("Patient", json=patient("w2")).status_code == 201


def test_target_ratelimit_header_on_every_response(target: TargetSandbox) -> None:
    assert "ratelimit" in httpx.get(target.fhir_url + "Patient").headers  # even a 401
    with fhir_client(target) as c:
        for r in (
            c.get("Patient"),
            c.get("Patient/not-a-uuid"),
            c.post("Patient", json={"resourceType": "Patient", "foo": 1}),
        ):
            assert FHIR_RE.search(r.headers["ratelimit"])
