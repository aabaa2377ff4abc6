"""Target sandbox: token endpoint and FHIR authentication (docs/medplum.md "Base URLs and auth", recorded cases 01-07)."""

from __future__ import annotations

import httpx
import pytest
from target_fixtures import TARGET_CLIENT, TARGET_SECRET, fhir_client, target_token

from pfsync.sandbox.target.server import TargetSandbox


def _token(target: TargetSandbox, **data: str) -> httpx.Response:
    return httpx.post(target.base_url + "oauth2/token", data=data)


def test_target_token_form_fields_returns_transcript_01_members(target: TargetSandbox) -> None:
    r = _token(target, grant_type="client_credentials", client_id=TARGET_CLIENT, client_secret=TARGET_SECRET)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {
        "token_type",
        "expires_in",
        "scope",
        "id_token",
        "access_token",
        "project",
        "profile",
        "smart_style_url",
        "need_patient_banner",
    }
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["scope"] == "openid"
    assert body["profile"]["reference"].startswith("ClientApplication/")
    assert r.headers["ratelimit"].startswith('"requests";r=')


def test_target_token_http_basic_is_accepted(target: TargetSandbox) -> None:
    r = httpx.post(
        target.base_url + "oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=(TARGET_CLIENT, TARGET_SECRET),
    )
    assert r.status_code == 200 and r.json()["access_token"]


@pytest.mark.parametrize(
    ("data", "description"),
    [
        (
            {"grant_type": "client_credentials", "client_id": TARGET_CLIENT, "client_secret": "wrong"},
            "Invalid secret",
        ),
        ({"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"}, "Invalid client"),
        ({"client_id": TARGET_CLIENT, "client_secret": TARGET_SECRET}, "Missing grant_type"),
    ],
)
def test_target_token_errors_are_400_invalid_request(
    target: TargetSandbox, data: dict[str, str], description: str
) -> None:
    r = _token(target, **data)
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_request", "error_description": description}


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-real-token"])
def test_target_fhir_without_valid_auth_is_401_login(
    target: TargetSandbox, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    r = httpx.get(target.fhir_url + "Patient?_count=1", headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert body["id"] == "unauthorized"
    assert body["issue"] == [{"severity": "error", "code": "login", "details": {"text": "Unauthorized"}}]


def test_target_basic_credentials_work_on_fhir_calls(target: TargetSandbox) -> None:
    r = httpx.get(target.fhir_url + "Patient", auth=(TARGET_CLIENT, TARGET_SECRET))
    assert r.status_code == 200 and r.json()["type"] == "searchset"
    assert httpx.get(target.fhir_url + "Patient", auth=(TARGET_CLIENT, "nope")).status_code == 401


def test_target_counts_token_requests(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        for _ in range(3):
            c.get("Patient")
    assert target.stats.token_requests == 1
    assert target.stats.requests[("GET", "search")] == 3


def test_target_tokens_expire_after_their_lifetime(target_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = target_factory(token_lifetime=-1)  # already expired when issued: no sleeping
    token = target_token(sandbox)
    r = httpx.get(sandbox.fhir_url + "Patient", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_target_token_lifetime_is_reported(target_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = target_factory(token_lifetime=5)
    r = httpx.post(
        sandbox.base_url + "oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=(TARGET_CLIENT, TARGET_SECRET),
    )
    assert r.json()["expires_in"] == 5


def test_target_expire_tokens_fault_rejects_old_tokens_only(target: TargetSandbox) -> None:
    old = target_token(target)
    target.faults.expire_tokens()
    assert (
        httpx.get(target.fhir_url + "Patient", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    )
    new = target_token(target)
    assert (
        httpx.get(target.fhir_url + "Patient", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    )
