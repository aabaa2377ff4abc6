"""SourceAuthenticator, discovery, scopes and BearerAuth against pytest-httpx fakes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from pytest_httpx import HTTPXMock
from test_auth_support import (
    BASE,
    METADATA_URL,
    SMART_URL,
    TOKEN_URL,
    FakeClock,
    Responder,
    basic_source,
    ec_key,
    jwt_source,
    pem,
    rsa_key,
    smart_config,
    token_body,
)

from pfsync.core.errors import AuthError, ConfigError, HTTPError
from pfsync.core.redact import MASK, Secret, redact
from pfsync.core.settings import HttpSettings, SourceSettings
from pfsync.net.http import RetryPolicy
from pfsync.net.tokens import BearerAuth, origin_of
from pfsync.source.auth import (
    ASSERTION_LIFETIME,
    JWT_BEARER,
    SourceAuthenticator,
    resolve_method,
    source_auth,
    token_failure_hint,
)
from pfsync.source.discovery import discover
from pfsync.source.scopes import build_scopes, choose_scope_version, split_granted

FAST = HttpSettings(retries=3, retry_max_wait=1.0)


def _form(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def _auth(source: SourceSettings, clock: FakeClock | None = None) -> SourceAuthenticator:
    return SourceAuthenticator(source, httpx.Client(), http=FAST, clock=clock or FakeClock())


def _mock_discovery(httpx_mock: HTTPXMock, v2: bool = True) -> None:
    httpx_mock.add_response(url=SMART_URL, json=smart_config(v2=v2), is_optional=True)


# ---- discovery ---------------------------------------------------------------------------------


def test_discover_reads_smart_configuration(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    found = discover(httpx.Client(), BASE + "/")
    assert (found.token_endpoint, found.found_in) == (TOKEN_URL, "smart-configuration")
    assert "permission-v2" in found.capabilities and found.smart_configuration


@pytest.mark.parametrize(
    "smart", [{"status_code": 404}, {"text": "<html>not json</html>"}, {"json": {"issuer": "x"}}]
)
def test_discover_falls_back_to_capability_oauth_uris(httpx_mock: HTTPXMock, smart: dict[str, Any]) -> None:
    httpx_mock.add_response(url=SMART_URL, **smart)
    capability = {"resourceType": "CapabilityStatement", "rest": [{"security": {"extension": [{
        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
        "extension": [{"url": "authorize", "valueUri": "https://x/auth"},
                      {"url": "token", "valueUri": "https://auth.example.com/token"}]}]}}]}  # fmt: skip
    httpx_mock.add_response(url=METADATA_URL, json=capability)
    found = discover(httpx.Client(), BASE)
    assert (found.token_endpoint, found.found_in) == ("https://auth.example.com/token", "metadata")


def test_discover_without_any_token_endpoint_is_a_config_error(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=SMART_URL, status_code=404)
    httpx_mock.add_response(url=METADATA_URL, json={"resourceType": "CapabilityStatement", "rest": [{}]})
    with pytest.raises(ConfigError) as info:
        discover(httpx.Client(), BASE)
    assert info.value.setting == "source.token_url" and "PFSYNC_TOKEN_URL" in (info.value.hint or "")


def test_discover_override_wins_but_capabilities_are_still_read(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    found = discover(httpx.Client(), BASE, token_url="https://other.example.com/oauth/token")
    assert (found.token_endpoint, found.found_in) == ("https://other.example.com/oauth/token", "setting")
    assert "permission-v2" in found.capabilities


def test_discover_override_survives_an_unreachable_smart_configuration(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=SMART_URL, is_reusable=True)
    clock = FakeClock()
    found = discover(httpx.Client(), BASE, token_url=TOKEN_URL, policy=RetryPolicy(retries=2), clock=clock)
    assert found.found_in == "setting" and not found.capabilities
    assert len(clock.sleeps) == 2  # retried with backoff first


def test_discover_unreachable_without_override_is_temporary(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=SMART_URL, is_reusable=True)
    with pytest.raises(HTTPError) as info:
        discover(httpx.Client(), BASE, policy=RetryPolicy(retries=1), clock=FakeClock())
    assert info.value.temporary


def test_discover_retries_a_503(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=SMART_URL, status_code=503)
    httpx_mock.add_response(url=SMART_URL, json=smart_config())
    clock = FakeClock()
    assert discover(httpx.Client(), BASE, clock=clock).found_in == "smart-configuration"
    assert len(clock.sleeps) == 1


# ---- scopes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "caps", "version"),
    [("auto", ["permission-v1", "permission-v2"], "v2"), ("auto", ["permission-v1"], "v1"), ("auto", [], "v1"),
     ("v1", ["permission-v2"], "v1"), ("v2", [], "v2")],
)  # fmt: skip
def test_choose_scope_version(setting: str, caps: list[str], version: str) -> None:
    assert choose_scope_version(setting, caps) == version


def test_build_scopes_v1_and_v2() -> None:
    assert build_scopes(["Patient", "Observation", "Patient"], "v1") == (
        "system/Patient.read",
        "system/Observation.read",
    )
    assert build_scopes(["Patient"], "v2") == ("system/Patient.rs",)


@pytest.mark.parametrize(
    ("granted", "ok", "missing"),
    [
        ("system/Patient.read system/Observation.read", ["Patient", "Observation"], []),
        ("system/Patient.read", ["Patient"], ["Observation"]),
        ("system/*.read", ["Patient", "Observation"], []),
        ("system/*.rs", ["Patient", "Observation"], []),
        ("system/*.*", ["Patient", "Observation"], []),
        ("system/Patient.cruds system/Observation.r", ["Patient", "Observation"], []),
        ("system/Patient.write system/Observation.c", [], ["Patient", "Observation"]),
        ("user/*.read patient/Observation.read openid", [], ["Patient", "Observation"]),
        ("", [], ["Patient", "Observation"]),
    ],
)
def test_split_granted_handles_versions_and_wildcards(
    granted: str, ok: list[str], missing: list[str]
) -> None:
    assert split_granted(granted.split(), ["Patient", "Observation"]) == (ok, missing)


# ---- method and configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "result"),
    [
        ({}, "private_key_jwt"),
        ({"private_key": None, "client_secret": Secret("xyz-secret")}, "client_secret_basic"),
        ({"client_secret": Secret("xyz-secret")}, "both"),
        ({"client_secret": Secret("xyz-secret"), "auth_method": "client_secret_basic"}, "client_secret_basic"),
        ({"client_secret": Secret("xyz-secret"), "auth_method": "private_key_jwt"}, "private_key_jwt"),
        ({"private_key": None}, "source.private_key"),
        ({"auth_method": "client_secret_basic"}, "source.client_secret"),
        ({"private_key": None, "auth_method": "private_key_jwt", "client_secret": Secret("xyz-secret")}, "source.private_key"),
        ({"client_id": None}, "source.client_id"),
    ],
)  # fmt: skip
def test_resolve_method_from_what_is_configured(overrides: dict[str, Any], result: str) -> None:
    source = jwt_source(**overrides)
    if result in ("private_key_jwt", "client_secret_basic"):
        assert resolve_method(source) == result
        return
    with pytest.raises(ConfigError) as info:
        resolve_method(source)
    assert (info.value.setting or "").endswith("auth_method" if result == "both" else result)


def test_authenticator_pem_without_kid_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="kid"):
        _auth(jwt_source(key_id=None))


def test_authenticator_refuses_http_token_endpoint_to_another_host(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=SMART_URL, json=smart_config(token_url="http://auth.example.com/token"))
    with pytest.raises(ConfigError, match="plain http"):
        _auth(jwt_source()).token()


# ---- the client assertion ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (rsa_key(), "RS384"),
        (ec_key("P-384"), "ES384"),
        (ec_key("P-256"), "ES256"),
        (ec_key("P-521"), "ES512"),
    ],
)
def test_assertion_header_and_claims(httpx_mock: HTTPXMock, key: Any, alg: str) -> None:
    _mock_discovery(httpx_mock)
    clock = FakeClock(t=float(int(time.time())))
    auth = _auth(jwt_source(private_key=Secret(pem(key)), key_id="kid-9", jku="https://app.example.com/jwks.json"),
                 clock)  # fmt: skip
    first, second = auth.client_assertion(), auth.client_assertion()
    header = jwt.get_unverified_header(first)
    assert header == {"alg": alg, "typ": "JWT", "kid": "kid-9", "jku": "https://app.example.com/jwks.json"}
    claims = jwt.decode(first, key.public_key(), algorithms=[alg], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == "client-a"
    assert claims["aud"] == TOKEN_URL
    assert 0 < claims["exp"] - clock.now() <= 300 and claims["exp"] - clock.now() == ASSERTION_LIFETIME
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]
    assert redact(first) == MASK  # registered: never printable


def test_assertion_without_jku_has_no_jku_header(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    assert "jku" not in jwt.get_unverified_header(_auth(jwt_source()).client_assertion())


def test_assertion_kid_comes_from_a_jwk_when_not_set(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key(), as_dict=True) | {"kid": "from-jwk"}
    auth = _auth(jwt_source(private_key=Secret(json.dumps(jwk)), key_id=None))
    assert jwt.get_unverified_header(auth.client_assertion())["kid"] == "from-jwk"


# ---- token requests ----------------------------------------------------------------------------


def test_token_request_private_key_jwt_form(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body())
    auth = _auth(jwt_source())
    assert auth.token() == "tok-1"
    request = httpx_mock.get_request(url=TOKEN_URL)
    assert request is not None
    form = _form(request)
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == JWT_BEARER
    assert form["scope"] == "system/Patient.rs system/Observation.rs"  # permission-v2 advertised
    claims = jwt.decode(form["client_assertion"], rsa_key().public_key(), algorithms=["RS384"], audience=TOKEN_URL,
                        options={"verify_exp": False})  # fmt: skip
    assert claims["iss"] == "client-a"
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"


def test_token_request_client_secret_basic(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock, v2=False)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body(scope="system/*.read"))
    auth = _auth(basic_source())
    auth.token()
    request = httpx_mock.get_request(url=TOKEN_URL)
    assert request is not None
    assert request.headers["authorization"] == httpx.BasicAuth("client-a", "s3cret-value")._auth_header
    form = _form(request)
    assert "client_assertion" not in form and form["scope"] == "system/Patient.read system/Observation.read"


def test_token_request_scope_version_forced_by_setting(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock, v2=True)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body())
    _auth(jwt_source(scope_version="v1")).token()
    request = httpx_mock.get_request(url=TOKEN_URL)
    assert request is not None and _form(request)["scope"] == "system/Patient.read system/Observation.read"


def test_token_is_cached_then_renewed_before_expiry(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body("tok-1", expires_in=300))
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body("tok-2", expires_in=300))
    clock = FakeClock()
    auth = _auth(jwt_source(), clock)
    assert auth.token() == "tok-1"
    clock.advance(200)  # 100 s left: still more than the 60 s margin
    assert auth.token() == "tok-1"
    clock.advance(45)  # 55 s left: renew now rather than fail mid-request
    assert auth.token() == "tok-2"
    assert auth.token_requests == 2
    assert len(httpx_mock.get_requests(url=SMART_URL)) == 1  # discovery once per authenticator


def test_token_force_and_invalidate(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    for n in (1, 2, 3):
        httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body(f"tok-{n}"))
    auth = _auth(jwt_source())
    assert auth.token() == "tok-1"
    assert auth.token(force=True) == "tok-2"
    auth.invalidate("tok-1")  # stale: another thread already renewed, keep tok-2
    assert auth.token() == "tok-2"
    auth.invalidate("tok-2")
    assert auth.token() == "tok-3"


def test_token_without_expires_in_assumes_five_minutes(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(
        url=TOKEN_URL, method="POST", json={"access_token": "tok-x", "token_type": "bearer"}
    )
    auth = _auth(jwt_source())
    auth.token()
    assert auth.last_token is not None and auth.last_token.lifetime == 300


@pytest.mark.parametrize(
    "failure",
    [
        {"status_code": 503},
        {"status_code": 429, "headers": {"Retry-After": "7"}},
        {"status_code": 500},
        "network",
    ],
)
def test_token_request_retries_transient_failures(httpx_mock: HTTPXMock, failure: Any) -> None:
    _mock_discovery(httpx_mock)
    if failure == "network":
        httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=TOKEN_URL)
    else:
        httpx_mock.add_response(url=TOKEN_URL, method="POST", **failure)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body())
    clock = FakeClock()
    auth = _auth(jwt_source(), clock)
    assert auth.token() == "tok-1"
    assert len(clock.sleeps) == 1
    if isinstance(failure, dict) and "headers" in failure:
        assert clock.sleeps == [1.0]  # Retry-After 7 clamped to retry_max_wait
    jtis = {jwt.decode(_form(r)["client_assertion"], options={"verify_signature": False})["jti"]
            for r in httpx_mock.get_requests(url=TOKEN_URL)}  # fmt: skip
    assert len(jtis) == 2  # a retry signs a fresh assertion


def test_token_request_gives_up_after_retries(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", status_code=503, is_reusable=True)
    with pytest.raises(HTTPError) as info:
        _auth(jwt_source()).token()
    assert info.value.temporary and len(httpx_mock.get_requests(url=TOKEN_URL)) == FAST.retries + 1


@pytest.mark.parametrize(
    ("status", "body", "hint_word"),
    [
        (400, {"error": "invalid_client", "error_description": "Unknown client"}, "client id"),
        (401, {"error": "invalid_client", "error_description": "Client authentication failed"}, "client id"),
        (400, {"error": "invalid_grant", "error_description": 'No public keys found in the JWKS with "kid" equal to "x"'}, "kid"),
        (400, {"error": "invalid_grant", "error_description": "Unable to verify the token: invalid signature"}, "does not match"),
        (400, {"error": "invalid_grant", "error_description": "jwt expired"}, "clock skew"),
        (400, {"error": "invalid_grant", "error_description": "Invalid token 'exp' value"}, "clock skew"),
        (400, {"error": "invalid_grant", "error_description": "Invalid token 'aud' value"}, "PFSYNC_TOKEN_URL"),
        (400, {"error": "invalid_scope", "error_description": "None of the requested scopes is authorised"}, "practice admin"),
        (403, {}, "practice admin"),
        (404, {}, "not a token endpoint"),
    ],
)  # fmt: skip
def test_token_refusal_is_auth_error_with_hint_and_no_retry(
    httpx_mock: HTTPXMock, status: int, body: dict[str, Any], hint_word: str
) -> None:
    _mock_discovery(httpx_mock)
    # An invalid_scope naming no type makes pfsync read the CapabilityStatement (issue 20): it lists none.
    httpx_mock.add_response(url=SMART_URL.replace("/.well-known/smart-configuration", "/metadata"),
                            status_code=404, is_optional=True)  # fmt: skip
    httpx_mock.add_response(url=TOKEN_URL, method="POST", status_code=status, json=body)
    with pytest.raises(AuthError) as info:
        _auth(jwt_source()).token()
    assert hint_word in (info.value.hint or "")
    assert f"HTTP {status}" in info.value.message
    if body:
        assert body["error_description"] in info.value.message
    assert len(httpx_mock.get_requests(url=TOKEN_URL)) == 1


def test_token_refusal_basic_names_the_secret(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", status_code=401, json={"error": "invalid_client"})
    with pytest.raises(AuthError) as info:
        _auth(basic_source()).token()
    assert "PF_CLIENT_SECRET" in (info.value.hint or "")
    assert "s3cret-value" not in f"{info.value} {info.value.hint}"


@pytest.mark.parametrize(
    "body",
    [
        {"token_type": "Bearer"},
        {"access_token": "", "token_type": "Bearer"},
        {"access_token": "t1234", "token_type": "mac"},
    ],
)
def test_token_response_that_is_not_a_bearer_token_is_an_auth_error(
    httpx_mock: HTTPXMock, body: dict[str, Any]
) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=body)
    with pytest.raises(AuthError):
        _auth(jwt_source()).token()


@pytest.mark.parametrize(
    ("status", "error", "method", "word"),
    [(400, "weird", "private_key_jwt", "check the client id"), (401, "", "private_key_jwt", "PF_CLIENT_ID"),
     (400, "unsupported_grant_type", "client_secret_basic", "client_credentials"),
     (400, "invalid_request", "client_secret_basic", "check the client id")],
)  # fmt: skip
def test_token_failure_hint_fallbacks(status: int, error: str, method: str, word: str) -> None:
    assert word in token_failure_hint(status, error, "", method)


# ---- granted scopes ----------------------------------------------------------------------------


def test_granted_types_names_the_missing(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body(scope="system/Patient.rs"))
    auth = _auth(jwt_source())
    assert auth.granted_scopes == frozenset()
    auth.token()
    assert auth.granted_scopes == {"system/Patient.rs"}
    assert auth.granted_types(["Patient", "Observation"]) == (["Patient"], ["Observation"])


def test_granted_scope_omitted_means_all_requested(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body(scope=None))
    auth = _auth(jwt_source())
    auth.token()
    assert auth.granted_types(["Patient", "Observation"]) == (["Patient", "Observation"], [])


def test_tokens_are_registered_for_redaction(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body("opaque-token-value-123"))
    _auth(jwt_source()).token()
    assert redact("token is opaque-token-value-123.") == f"token is {MASK}."


def test_token_fetch_is_serialised_across_threads(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body(), is_reusable=True)
    auth = _auth(jwt_source())
    barrier = threading.Barrier(8)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(auth.token())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["tok-1"] * 8
    assert len(httpx_mock.get_requests(url=TOKEN_URL)) == 1


def test_several_sources_keep_their_own_endpoint_audience_and_token(httpx_mock: HTTPXMock) -> None:
    other = "https://ehr.example.com/fhir/r4/v1/practice-b"
    httpx_mock.add_response(url=SMART_URL, json=smart_config())
    httpx_mock.add_response(
        url=f"{other}/.well-known/smart-configuration", json=smart_config(f"{other}/token")
    )
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body("tok-a"))
    httpx_mock.add_response(url=f"{other}/token", method="POST", json=token_body("tok-b"))
    a = _auth(jwt_source())
    b = _auth(jwt_source(name="practice-b", base_url=other))
    assert (a.token(), b.token()) == ("tok-a", "tok-b")
    for url in (TOKEN_URL, f"{other}/token"):
        request = httpx_mock.get_request(url=url)
        assert request is not None
        assert (
            jwt.decode(_form(request)["client_assertion"], options={"verify_signature": False})["aud"] == url
        )


# ---- BearerAuth --------------------------------------------------------------------------------


class FakeProvider:
    def __init__(self) -> None:
        self.n = 1
        self.invalidated: list[str] = []

    def token(self, *, force: bool = False) -> str:
        return f"tok-{self.n}"

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        self.n += 1

    def prove(self) -> str:
        return self.token(force=True)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("https://h.example", "https://h.example:443/x", True), ("http://h", "http://h:80", True),
     ("https://h", "http://h", False), ("https://h:8443", "https://h", False), ("https://H.example", "https://h.example", True)],
)  # fmt: skip
def test_origin_of_normalises_default_ports(a: str, b: str, same: bool) -> None:
    assert (origin_of(a) == origin_of(b)) == same


def test_bearer_auth_only_sends_token_to_allowed_origins(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", json={})
    httpx_mock.add_response(url="https://storage.example.net/file.ndjson", text="{}")
    client = httpx.Client(auth=BearerAuth(FakeProvider(), origins=[BASE]))
    client.get(f"{BASE}/Patient")
    client.get("https://storage.example.net/file.ndjson")
    own, foreign = httpx_mock.get_requests()
    assert own.headers["authorization"] == "Bearer tok-1"
    assert "authorization" not in foreign.headers


def test_bearer_auth_renews_once_on_401_and_retries(httpx_mock: HTTPXMock) -> None:
    responder = Responder(httpx.Response(401), httpx.Response(200, json={"ok": True}))
    httpx_mock.add_callback(responder, url=f"{BASE}/Patient", method="POST", is_reusable=True)
    provider = FakeProvider()
    client = httpx.Client(auth=BearerAuth(provider, origins=[BASE]))
    response = client.post(f"{BASE}/Patient", content=b'{"resourceType":"Patient"}')
    assert response.json() == {"ok": True}
    assert responder.seen == ["Bearer tok-1", "Bearer tok-2"]
    assert responder.bodies == [b'{"resourceType":"Patient"}'] * 2  # the body is replayed
    assert provider.invalidated == ["tok-1"]


def test_bearer_auth_gives_up_after_the_second_401(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", status_code=401, is_reusable=True)
    provider = FakeProvider()
    response = httpx.Client(auth=BearerAuth(provider, origins=[BASE])).get(f"{BASE}/Patient")
    assert response.status_code == 401
    assert len(httpx_mock.get_requests()) == 2 and provider.invalidated == ["tok-1"]


def test_bearer_auth_retries_a_streamed_download(httpx_mock: HTTPXMock) -> None:
    url = f"{BASE}/Binary/export/1/Patient/1"
    httpx_mock.add_response(url=url, status_code=401, json={"resourceType": "OperationOutcome"})
    httpx_mock.add_response(url=url, stream=httpx.ByteStream(b'{"id":"1"}\n{"id":"2"}\n'))
    client = httpx.Client(auth=BearerAuth(FakeProvider(), origins=[BASE]))
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert b"".join(response.iter_bytes()) == b'{"id":"1"}\n{"id":"2"}\n'


def test_source_auth_with_the_real_authenticator_end_to_end(httpx_mock: HTTPXMock) -> None:
    _mock_discovery(httpx_mock)
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body("tok-1"))
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body("tok-2"))
    groups = Responder(httpx.Response(401), httpx.Response(200, json={"resourceType": "Bundle"}))
    httpx_mock.add_callback(groups, url=f"{BASE}/Group", is_reusable=True)
    files = Responder(httpx.Response(200, text="x"))
    httpx_mock.add_callback(files, url="https://files.example.org/f")
    client = httpx.Client()
    authenticator, bearer = source_auth(jwt_source(download_allowlist=("https://files.example.org",)), client,
                                        http=FAST, clock=FakeClock())  # fmt: skip
    client.auth = bearer  # the token request goes through the same client without recursing
    assert client.get(f"{BASE}/Group").status_code == 200
    assert client.get(f"{BASE}/Group").status_code == 200
    assert client.get("https://files.example.org/f").status_code == 200
    assert groups.seen == ["Bearer tok-1", "Bearer tok-2", "Bearer tok-2"]
    assert files.seen == ["Bearer tok-2"]
    token_requests = httpx_mock.get_requests(url=TOKEN_URL)
    assert len(token_requests) == 2 and all("authorization" not in r.headers for r in token_requests)
    assert authenticator.token_requests == 2


def test_source_settings_replace_keeps_secret_hidden() -> None:
    source = replace(jwt_source(), client_secret=Secret("hidden-one"))
    assert "hidden-one" not in repr(source) and "BEGIN" not in repr(source)


def test_source_auth_refuses_plain_http_allowlist_origin() -> None:
    with pytest.raises(ConfigError, match="plain http"):
        source_auth(jwt_source(download_allowlist=("http://storage.example.com",)), httpx.Client())
    _, bearer = source_auth(jwt_source(download_allowlist=("http://127.0.0.1:9000",)), httpx.Client())
    assert "http://127.0.0.1:9000" in bearer.origins
