"""Medplum client_credentials auth: form fields, caching, renewal, 400 errors, Basic fallback."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from pytest_httpx import HTTPXMock
from test_auth_support import FakeClock, Responder

from pfsync.core.errors import AuthError, ConfigError
from pfsync.core.redact import MASK, Secret, redact
from pfsync.core.settings import HttpSettings, MedplumSettings
from pfsync.medplum.auth import MedplumAuthenticator, OriginBasicAuth, medplum_auth, shared_authenticator
from pfsync.net.tokens import BearerAuth

BASE = "https://medplum.example.com/"
TOKEN = BASE + "oauth2/token"
FHIR = BASE + "fhir/R4/"
SETTINGS = MedplumSettings(base_url=BASE, client_id="mp-client", client_secret=Secret("mp-secret-value"))
FAST = HttpSettings(retries=2, retry_max_wait=1.0)


def _token(value: str = "mp-token-1", expires_in: int = 3600) -> dict[str, Any]:
    # docs/medplum.md, recorded case 01's members
    return {"token_type": "Bearer", "expires_in": expires_in, "scope": "openid", "id_token": value + "-id",
            "access_token": value, "project": {"reference": "Project/1"}, "profile": {"reference": "ClientApplication/1"}}  # fmt: skip


def test_medplum_token_uses_form_fields(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=TOKEN, method="POST", json=_token())
    auth = MedplumAuthenticator(SETTINGS, httpx.Client(), http=FAST, clock=FakeClock())
    assert auth.token() == "mp-token-1"
    request = httpx_mock.get_request()
    assert request is not None
    form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "mp-client",
        "client_secret": "mp-secret-value",
    }
    assert redact("mp-token-1 mp-token-1-id") == f"{MASK} {MASK}"


def test_medplum_token_is_cached_for_an_hour_then_renewed(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=TOKEN, method="POST", json=_token("mp-token-1"))
    httpx_mock.add_response(url=TOKEN, method="POST", json=_token("mp-token-2"))
    clock = FakeClock()
    auth = MedplumAuthenticator(SETTINGS, httpx.Client(), http=FAST, clock=clock)
    assert {auth.token() for _ in range(50)} == {"mp-token-1"}
    clock.advance(3500)  # 100 s left
    assert auth.token() == "mp-token-1"
    clock.advance(50)  # 50 s left: inside the 60 s margin
    assert auth.token() == "mp-token-2"
    assert auth.token_requests == 2


@pytest.mark.parametrize(
    ("description", "hint"),
    [("Invalid secret", "MEDPLUM_CLIENT_SECRET"), ("Invalid client", "MEDPLUM_CLIENT_ID"),
     ("Missing grant_type", "MEDPLUM_BASE_URL")],
)  # fmt: skip
def test_medplum_token_400_is_auth_error_without_retry(
    httpx_mock: HTTPXMock, description: str, hint: str
) -> None:
    # docs/medplum.md, recorded cases 03-05: all 400 invalid_request
    httpx_mock.add_response(url=TOKEN, method="POST", status_code=400,
                            json={"error": "invalid_request", "error_description": description})  # fmt: skip
    with pytest.raises(AuthError) as info:
        MedplumAuthenticator(SETTINGS, httpx.Client(), http=FAST, clock=FakeClock()).token()
    assert description in info.value.message and hint in (info.value.hint or "")
    assert "mp-secret-value" not in f"{info.value.message} {info.value.hint}"
    assert len(httpx_mock.get_requests()) == 1


def test_medplum_token_429_is_retried(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=TOKEN, method="POST", status_code=429)
    httpx_mock.add_response(url=TOKEN, method="POST", json=_token())
    clock = FakeClock()
    assert MedplumAuthenticator(SETTINGS, httpx.Client(), http=FAST, clock=clock).token() == "mp-token-1"
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize(
    ("field", "setting"), [("client_id", "medplum.client_id"), ("client_secret", "medplum.client_secret")]
)
def test_medplum_missing_credentials_is_config_error(field: str, setting: str) -> None:
    settings = MedplumSettings(**{**SETTINGS.__dict__, field: None})
    with pytest.raises(ConfigError) as info:
        MedplumAuthenticator(settings, httpx.Client())
    assert info.value.setting == setting
    with pytest.raises(ConfigError):
        medplum_auth(MedplumSettings(**{**SETTINGS.__dict__, field: None, "auth": "basic"}), httpx.Client())


def test_medplum_auth_bearer_one_token_for_many_calls_and_one_renewal_on_401(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=TOKEN, method="POST", json=_token("mp-token-1"))
    httpx_mock.add_response(url=TOKEN, method="POST", json=_token("mp-token-2"))
    responder = Responder(
        *([httpx.Response(200, json={})] * 5), httpx.Response(401), httpx.Response(200, json={})
    )
    httpx_mock.add_callback(responder, url=FHIR + "Patient", is_reusable=True)
    client = httpx.Client()
    auth = medplum_auth(SETTINGS, client, clock=FakeClock(), http=FAST)
    assert isinstance(auth, BearerAuth)
    client.auth = auth  # the token request on the same client must not recurse into BearerAuth
    for _ in range(7):
        assert client.get(FHIR + "Patient").status_code == 200
    assert responder.seen == ["Bearer mp-token-1"] * 6 + ["Bearer mp-token-2"] * 2
    tokens = httpx_mock.get_requests(url=TOKEN)
    assert len(tokens) == 2 and all("authorization" not in r.headers for r in tokens)


def test_medplum_auth_basic_on_medplum_origin_only(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=FHIR + "Patient", json={})
    httpx_mock.add_response(url="https://ehr.example.com/Binary/1", content=b"x")
    client = httpx.Client()
    client.auth = medplum_auth(MedplumSettings(**{**SETTINGS.__dict__, "auth": "basic"}), client)
    assert isinstance(client.auth, OriginBasicAuth)
    client.get(FHIR + "Patient")
    client.get("https://ehr.example.com/Binary/1")
    medplum, other = httpx_mock.get_requests()
    assert medplum.headers["authorization"] == httpx.BasicAuth("mp-client", "mp-secret-value")._auth_header
    assert "authorization" not in other.headers
    assert not httpx_mock.get_requests(url=TOKEN)  # Basic never asks for a token


def test_shared_authenticator_is_one_per_clock_object_not_per_id() -> None:
    """One authenticator per clock object (this FakeClock is not even hashable): the cache keeps the
    clock it keys by id, so no later clock can reuse that id and get a token timed by another."""
    first, second = FakeClock(), FakeClock()
    shared = shared_authenticator(SETTINGS, http=FAST, clock=first)
    assert shared_authenticator(SETTINGS, http=FAST, clock=first) is shared
    assert shared_authenticator(SETTINGS, http=FAST, clock=second) is not shared
    assert shared_authenticator(SETTINGS, http=FAST) is shared_authenticator(SETTINGS, http=FAST)
