"""MedplumClient over real HTTP against the target sandbox: paging, one renewal after revoked
tokens, throttled 429s and 5xx waited out, the quota report (docs/medplum.md "Searching",
"Base URLs and auth", "Quotas and 429")."""

from __future__ import annotations

import pytest
from conftest import closed_at_end
from doubles import FakeClock
from target_fixtures import (
    MRN,
    TARGET_CLIENT,
    TARGET_SECRET,
    batch,
    conditional_put_entry,
    fhir_client,
    patient,
)

from pfsync.core.redact import Secret
from pfsync.core.settings import HttpSettings, MedplumSettings
from pfsync.medplum.auth import medplum_auth
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import RetryPolicy, make_client
from pfsync.sandbox.target.server import TargetSandbox

FAST = HttpSettings(retries=2, retry_max_wait=1.0)


@pytest.fixture
def medplum(target: TargetSandbox) -> MedplumClient:
    settings = MedplumSettings(
        base_url=target.base_url, client_id=TARGET_CLIENT, client_secret=Secret(TARGET_SECRET)
    )
    http = closed_at_end(make_client(FAST))
    clock = FakeClock()
    # A private authenticator over this client (medplum_auth with a client), so counts are this test's.
    auth = medplum_auth(settings, http, clock=clock, http=FAST)
    return MedplumClient(http, fhir_url=settings.fhir_url, auth=auth, clock=clock,
                         policy=RetryPolicy.from_settings(FAST))  # fmt: skip


def _load(target: TargetSandbox, n: int) -> None:
    with fhir_client(target) as client:
        body = batch(*(conditional_put_entry(patient(f"mrn-{i}")) for i in range(n)))
        assert client.post("", json=body).status_code == 200


def test_client_pages_a_search_against_the_sandbox(target: TargetSandbox, medplum: MedplumClient) -> None:
    _load(target, 5)
    found = medplum.search_all("Patient", {"identifier": f"{MRN}|", "_count": "2"})
    assert sorted(r["identifier"][0]["value"] for r in found) == [f"mrn-{i}" for i in range(5)]
    assert medplum.stats.requests == 3 and medplum.stats.searches == 3


def test_client_renews_a_revoked_token_once_and_goes_on(
    target: TargetSandbox, medplum: MedplumClient
) -> None:
    _load(target, 1)
    assert medplum.search_all("Patient", {"identifier": f"{MRN}|mrn-0"})
    tokens_before = target.stats.token_requests
    target.faults.expire_tokens()
    assert medplum.search_all("Patient", {"identifier": f"{MRN}|mrn-0"})
    assert target.stats.token_requests == tokens_before + 1


def test_client_waits_out_throttled_429s_and_5xx(target: TargetSandbox, medplum: MedplumClient) -> None:
    _load(target, 1)
    target.faults.throttle_next(4)  # more 429s than http.retries: a spent quota window is no failure
    target.faults.error_next(1, status=503)
    assert medplum.search_all("Patient", {"identifier": f"{MRN}|mrn-0"})
    assert medplum.stats.throttled == 4 and medplum.stats.requests == 6
    assert medplum.pacer.enforced is True  # the 429s proved the quota is enforced
