"""Target sandbox: injectable faults, from Python and over the /_sandbox control routes."""

from __future__ import annotations

import httpx
import pytest
from target_fixtures import batch, conditional_put_entry, fhir_client, patient

from pfsync.sandbox.target.server import TargetSandbox


def test_target_fault_throttle_next_n(target: TargetSandbox) -> None:
    target.faults.throttle_next(2)
    with fhir_client(target) as c:
        statuses = [c.get("Patient").status_code for _ in range(3)]
        r = c.get("Patient")
    assert statuses == [429, 429, 200]
    assert "retry-after" not in r.headers


@pytest.mark.parametrize("status", [500, 503])
def test_target_fault_server_errors(target: TargetSandbox, status: int) -> None:
    target.faults.error_next(1, status)
    with fhir_client(target) as c:
        assert c.get("Patient").status_code == status
        assert c.get("Patient").status_code == 200


def test_target_fault_connection_reset(target: TargetSandbox) -> None:
    target.faults.reset_next(1)
    with fhir_client(target) as c:
        with pytest.raises(httpx.TransportError):
            c.get("Patient")
        assert c.get("Patient").status_code == 200
    assert target.stats.faults_fired["reset"] == 1


def test_target_fault_too_large(target: TargetSandbox) -> None:
    target.faults.too_large_next(1)
    with fhir_client(target) as c:
        r = c.post("", json=batch(conditional_put_entry(patient("tl"))))
    assert r.status_code == 400 and r.json()["issue"][0]["details"]["text"] == "File too large"
    assert target.count("Patient") == 0


def test_target_control_routes_arm_faults_and_read_stats(target: TargetSandbox) -> None:
    ctl = target.base_url + "_sandbox/"
    assert httpx.post(ctl + "faults/throttle", json={"n": 1}).status_code == 200
    assert httpx.post(ctl + "faults/error", json={"n": 1, "status": 503}).status_code == 200
    assert httpx.post(ctl + "faults/conflicts", json={"rate": 1.0}).status_code == 200
    assert httpx.get(ctl + "faults").json()["conflict_rate"] == 1.0
    with fhir_client(target) as c:
        assert c.get("Patient").status_code == 503  # errors fire before throttles
        assert c.get("Patient").status_code == 429
        r = c.post("", json=batch(conditional_put_entry(patient("ctl")))).json()
    assert r["entry"][0]["response"]["status"] == "409"
    httpx.post(ctl + "faults/expire-tokens")
    with fhir_client(target) as c:
        assert c.get("Patient").status_code == 200  # a fresh token works
    stats = httpx.get(ctl + "stats").json()
    assert stats["token_requests"] == 2 and stats["entries"] == {"409": 1}
    assert httpx.post(ctl + "reset").status_code == 200
    assert httpx.get(ctl + "faults").json()["conflict_rate"] == 0.0
    assert httpx.post(ctl + "nope").status_code == 404


def test_target_control_route_adds_client(target: TargetSandbox) -> None:
    r = httpx.post(
        target.base_url + "_sandbox/clients", json={"client_id": "extra", "secret": "s", "quota": 500}
    )
    assert r.status_code == 200
    with fhir_client(target, "extra", "s") as c:
        assert c.get("Patient").status_code == 200
