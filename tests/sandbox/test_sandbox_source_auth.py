"""Source sandbox: discovery documents, the token endpoint's rules and bearer checks (docs/practice-fusion.md "Auth (system apps)")."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest
from source_fixtures import (
    SOURCE_JWT_CLIENT,
    SourceKeys,
    assertion_form,
    kickoff_headers,
    mint_assertion,
    source_token,
)

from pfsync.sandbox.source.auth import generate_test_keys
from pfsync.sandbox.source.server import SourceSandbox

pytestmark = pytest.mark.integration


def _post(source: SourceSandbox, form: dict[str, str], **kw: object) -> httpx.Response:
    return httpx.post(source.token_url(), data=form, **kw)  # type: ignore[arg-type]


def test_smart_configuration_advertises_pf_token_endpoint_and_methods(source: SourceSandbox) -> None:
    resp = httpx.get(source.base_url() + "/.well-known/smart-configuration")
    doc = resp.json()
    assert resp.status_code == 200
    assert doc["token_endpoint"] == source.base_url() + "/token"
    assert {"private_key_jwt", "client_secret_basic"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert {"RS384", "ES384"} <= set(doc["token_endpoint_auth_signing_alg_values_supported"])
    assert {"permission-v1", "permission-v2"} <= set(doc["capabilities"])
    assert "system/Patient.read" in doc["scopes_supported"] and "system/*.rs" in doc["scopes_supported"]


def test_smart_configuration_without_v2_drops_permission_v2(source: SourceSandbox) -> None:
    source.configure(smart_v2=False)
    doc = httpx.get(source.base_url() + "/.well-known/smart-configuration").json()
    assert "permission-v2" not in doc["capabilities"] and "system/*.rs" not in doc["scopes_supported"]


def test_metadata_declares_fhir_401_oauth_uris_and_export(source: SourceSandbox) -> None:
    resp = httpx.get(source.base_url() + "/metadata")
    cap = resp.json()
    assert resp.headers["content-type"].startswith(
        "application/fhir+json"
    )  # docs/bulk-data.md "Surprises in the recordings", item 1: only /metadata
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    rest = cap["rest"][0]
    oauth = rest["security"]["extension"][0]
    assert oauth["url"].endswith("oauth-uris")
    assert oauth["extension"][0] == {"url": "token", "valueUri": source.token_url()}
    types = {r["type"] for r in rest["resource"]}
    assert {"Patient", "Observation", "Claim"} <= types
    ops = [op for r in rest["resource"] for op in r.get("operation", [])]
    assert {o["definition"].rsplit("/", 1)[1] for o in ops} == {"patient-export", "group-export"}


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_assertion_valid_gets_bearer(source: SourceSandbox, source_keys: SourceKeys, alg: str) -> None:
    resp = _post(source, assertion_form(mint_assertion(source_keys, source.token_url(), alg=alg)))
    body = resp.json()
    assert resp.status_code == 200, body
    assert (
        body["token_type"] == "Bearer"
    )  # docs/practice-fusion.md (the reference server says "bearer", docs/bulk-data.md, recorded case 03)
    assert body["scope"] == "system/*.read" and body["expires_in"] == 300 and body["access_token"]


@pytest.mark.parametrize("alg", ["ES256", "ES512"])
def test_token_assertion_other_ec_algs_accepted(source: SourceSandbox, alg: str) -> None:
    key, jwks = generate_test_keys(alg, f"k-{alg}")
    source.register_client("ec-client", jwks=jwks)
    keys = SourceKeys(key, f"k-{alg}", key, f"k-{alg}", jwks)
    resp = _post(
        source, assertion_form(mint_assertion(keys, source.token_url(), alg=alg, client_id="ec-client"))
    )
    assert resp.status_code == 200, resp.text


def test_token_basic_auth_valid_and_wrong_secret(source: SourceSandbox) -> None:
    form = {"grant_type": "client_credentials", "scope": "system/Patient.read"}
    assert _post(source, form, auth=("pfsync-sandbox", "sandbox-secret")).status_code == 200
    bad = _post(source, form, auth=("pfsync-sandbox", "nope"))
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"aud": "http://elsewhere/token"}, "invalid_grant"),  # docs/bulk-data.md, recorded case 05
        ({"exp_in": -60}, "invalid_grant"),  # docs/bulk-data.md, recorded case 12
        # docs/practice-fusion.md: exp at most 300 s (docs/bulk-data.md, recorded case 07 takes 600)
        ({"exp_in": 600}, "invalid_grant"),
        ({"header": {"kid": "unknown-kid-0000"}}, "invalid_grant"),  # docs/bulk-data.md, recorded case 09
        ({"drop_typ": True}, "invalid_request"),  # docs/bulk-data.md, recorded case 13
        ({"claims": {"sub": "someone-else"}}, "invalid_grant"),
        ({"header": {"typ": "JOSE"}}, "invalid_request"),
    ],
)
def test_token_assertion_refused(
    source: SourceSandbox, source_keys: SourceKeys, kwargs: dict[str, Any], error: str
) -> None:
    aud = kwargs.pop("aud", source.token_url())
    resp = _post(source, assertion_form(mint_assertion(source_keys, aud, **kwargs)))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == error and resp.json()["error_description"]


def test_token_assertion_wrong_signing_key_refused(source: SourceSandbox, source_keys: SourceKeys) -> None:
    other, _ = generate_test_keys("RS384")
    resp = _post(source, assertion_form(mint_assertion(source_keys, source.token_url(), key=other)))
    assert (
        resp.status_code == 400 and "invalid signature" in resp.json()["error_description"]
    )  # docs/bulk-data.md, recorded case 10


def test_token_assertion_aud_scheme_difference_accepted(
    source: SourceSandbox, source_keys: SourceKeys
) -> None:
    aud = source.token_url().replace("http://", "https://")  # docs/bulk-data.md, recorded case 06
    assert _post(source, assertion_form(mint_assertion(source_keys, aud))).status_code == 200


def test_token_assertion_other_practice_aud_refused(source_keys: SourceKeys) -> None:
    with SourceSandbox(practices=["p-one", "p-two"]) as sandbox:
        sandbox.register_client(SOURCE_JWT_CLIENT, jwks=source_keys.jwks, practice="p-two")
        form = assertion_form(mint_assertion(source_keys, sandbox.token_url("p-one")))
        resp = httpx.post(sandbox.token_url("p-two"), data=form)
        assert (
            resp.status_code == 400 and resp.json()["error"] == "invalid_grant"
        )  # one assertion per practice


def test_token_assertion_reused_jti_refused(source: SourceSandbox, source_keys: SourceKeys) -> None:
    # docs/practice-fusion.md: jti unique; the reference server does not track it (docs/bulk-data.md, recorded case 08)
    assertion = mint_assertion(source_keys, source.token_url(), jti="same-jti")
    assert _post(source, assertion_form(assertion)).status_code == 200
    again = _post(source, assertion_form(assertion))
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_token_assertion_reused_jti_accepted_when_tracking_off(
    source: SourceSandbox, source_keys: SourceKeys
) -> None:
    source.configure(track_jti=False, max_assertion_lifetime=600)
    assertion = mint_assertion(source_keys, source.token_url(), jti="same-jti", exp_in=590)
    assert [_post(source, assertion_form(assertion)).status_code for _ in range(2)] == [200, 200]


@pytest.mark.parametrize(
    ("form", "error"),
    [
        # docs/bulk-data.md, recorded case 15
        ({"grant_type": "authorization_code"}, "unsupported_grant_type"),
        # docs/bulk-data.md, recorded case 11
        ({"grant_type": "client_credentials", "client_assertion": "x"}, "invalid_request"),
    ],
)
def test_token_form_errors(source: SourceSandbox, form: dict[str, str], error: str) -> None:
    resp = _post(source, form)
    assert resp.status_code == 400 and resp.json()["error"] == error


def test_token_json_body_refused(source: SourceSandbox) -> None:
    resp = httpx.post(source.token_url(), json={"grant_type": "client_credentials"})
    # docs/bulk-data.md, recorded case 15
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("scope", "status", "granted"),
    [
        ("user/*.read", 400, None),
        ("system/Foo.read", 400, None),
        ("", 400, None),
        ("system/Patient.read system/Observation.read", 200, "system/Patient.read system/Observation.read"),
        ("system/*.rs", 200, "system/*.rs"),
    ],
)
def test_token_scopes_like_transcript_14(
    source: SourceSandbox, source_keys: SourceKeys, scope: str, status: int, granted: str | None
) -> None:
    resp = _post(source, assertion_form(mint_assertion(source_keys, source.token_url()), scope))
    assert resp.status_code == status, resp.text
    if granted is None:
        assert resp.json()["error"] == "invalid_scope"
    else:
        assert resp.json()["scope"] == granted


def test_token_scopes_narrowed_to_client_allowed(source: SourceSandbox, source_keys: SourceKeys) -> None:
    source.register_client(SOURCE_JWT_CLIENT, jwks=source_keys.jwks, allowed_scopes=["system/Patient.read"])
    resp = _post(source, assertion_form(mint_assertion(source_keys, source.token_url()), "system/*.read"))
    assert resp.json()["scope"] == "system/Patient.read"  # docs/practice-fusion.md: granted may be fewer
    token = resp.json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(source.base_url() + "/Observation", headers=auth).status_code == 403
    assert httpx.get(source.base_url() + "/Patient", headers=auth).status_code == 200


def test_token_v2_scope_refused_when_v2_off(source: SourceSandbox) -> None:
    source.configure(smart_v2=False)
    resp = _post(source, {"grant_type": "client_credentials", "scope": "system/*.rs"},
                 auth=("pfsync-sandbox", "sandbox-secret"))  # fmt: skip
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_scope"


def test_bearer_missing_gets_401_operation_outcome(source: SourceSandbox) -> None:
    resp = httpx.get(source.base_url() + "/Patient/$export", headers=kickoff_headers(None))
    # docs/bulk-data.md, recorded case 20
    assert resp.status_code == 401 and "www-authenticate" not in resp.headers
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_bearer_garbage_and_expired_get_401(source: SourceSandbox) -> None:
    assert (
        httpx.get(source.base_url() + "/Patient", headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    source.configure(token_lifetime=1)
    token = source_token(source)
    time.sleep(1.1)
    resp = httpx.get(source.base_url() + "/Patient", headers={"Authorization": f"Bearer {token}"})
    # docs/bulk-data.md, recorded case 80
    assert resp.status_code == 401 and resp.json()["resourceType"] == "OperationOutcome"


def test_bearer_from_other_practice_refused(source_keys: SourceKeys) -> None:
    with SourceSandbox(practices=["p-one", "p-two"]) as sandbox:
        token = source_token(sandbox, practice="p-one")
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(sandbox.base_url("p-one") + "/Patient", headers=auth).status_code == 200
        assert httpx.get(sandbox.base_url("p-two") + "/Patient", headers=auth).status_code == 401


def test_revoke_tokens_invalidates_live_token(source: SourceSandbox) -> None:
    token = source_token(source)
    source.revoke_tokens()
    assert (
        httpx.get(source.base_url() + "/Patient", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )


def test_basic_header_is_base64(source: SourceSandbox) -> None:
    raw = base64.b64encode(b"pfsync-sandbox:sandbox-secret").decode()
    resp = _post(source, {"grant_type": "client_credentials", "scope": "system/*.read"},
                 headers={"Authorization": f"Basic {raw}"})  # fmt: skip
    assert resp.status_code == 200
