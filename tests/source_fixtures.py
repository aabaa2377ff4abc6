"""pytest fixtures for the source (Bulk Data) sandbox. Owned by the source sandbox work.

- `source_sandbox` (session): a started `SourceSandbox` with fixtures/synthea-small, a JWT client
  (`SOURCE_JWT_CLIENT`, RS384 and ES384 keys) and the default Basic client.
- `source` (function): the same sandbox, reset (data, faults, jobs, tokens, counters) before each test.
- `source_keys` (session): the private keys and their JWKS.
- Helpers: `mint_assertion(...)`, `source_token(...)`, `kickoff_headers(token)`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from server_fixtures import starts_servers

from pfsync.sandbox.source.auth import JWT_BEARER, generate_test_keys
from pfsync.sandbox.source.server import SourceSandbox

__all__ = [
    "SOURCE_JWT_CLIENT",
    "SourceKeys",
    "assertion_form",
    "export_and_wait",
    "kickoff_headers",
    "mint_assertion",
    "read_ndjson",
    "source",
    "source_keys",
    "source_sandbox",
    "source_token",
]

SYNTHEA_SMALL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "synthea-small"
SOURCE_JWT_CLIENT = "pfsync-jwt-client"


@dataclass(frozen=True)
class SourceKeys:
    rsa: Any
    rsa_kid: str
    ec: Any
    ec_kid: str
    jwks: dict[str, Any]


@pytest.fixture(scope="session")
def source_keys() -> SourceKeys:
    rsa_key, rsa_jwks = generate_test_keys("RS384", "rsa-test-key")
    ec_key, ec_jwks = generate_test_keys("ES384", "ec-test-key")
    return SourceKeys(
        rsa_key, "rsa-test-key", ec_key, "ec-test-key", {"keys": rsa_jwks["keys"] + ec_jwks["keys"]}
    )


@pytest.fixture(scope="session")
@starts_servers
def source_sandbox(source_keys: SourceKeys) -> Iterator[SourceSandbox]:
    if not SYNTHEA_SMALL.is_dir():
        pytest.fail(f"fixtures missing: {SYNTHEA_SMALL}")
    sandbox = SourceSandbox(data_dir=SYNTHEA_SMALL, resources_per_file=1_000).start()
    sandbox.register_client(SOURCE_JWT_CLIENT, jwks=source_keys.jwks)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def source(source_sandbox: SourceSandbox, source_keys: SourceKeys) -> SourceSandbox:
    """The session sandbox, reset for this test (the JWT client is registered again after the reset)."""
    source_sandbox.reset()
    source_sandbox.register_client(SOURCE_JWT_CLIENT, jwks=source_keys.jwks)
    return source_sandbox


def mint_assertion(
    keys: SourceKeys,
    aud: str,
    *,
    alg: str = "RS384",
    client_id: str = SOURCE_JWT_CLIENT,
    exp_in: float = 240,
    jti: str | None = None,
    header: dict[str, Any] | None = None,
    drop_typ: bool = False,
    key: Any = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """A client assertion like a real SMART client makes; every knob can be bent to test refusals."""
    signing_key = key or (keys.ec if alg.startswith("ES") else keys.rsa)
    headers: dict[str, Any] = {"kid": keys.ec_kid if alg.startswith("ES") else keys.rsa_kid, "typ": "JWT"}
    headers.update(header or {})
    if drop_typ:
        headers.pop("typ")
    body = {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(time.time() + exp_in),
            "jti": jti or uuid.uuid4().hex}  # fmt: skip
    body.update(claims or {})
    token = jwt.encode(body, signing_key, algorithm=alg, headers=headers)
    if drop_typ:  # PyJWT always adds typ; rebuild the header without it
        import base64
        import json

        raw = base64.urlsafe_b64encode(json.dumps({"alg": alg, "kid": headers["kid"]}).encode()).rstrip(b"=")
        payload = token.split(".")[1]
        signing_input = raw + b"." + payload.encode()
        algo = jwt.get_algorithm_by_name(alg)
        sig = base64.urlsafe_b64encode(algo.sign(signing_input, signing_key)).rstrip(b"=")
        token = (signing_input + b"." + sig).decode()
    return token


def source_token(sandbox: SourceSandbox, scope: str = "system/*.read", practice: str | None = None) -> str:
    """A bearer token through client_secret_basic (the quick path for tests that are not about auth)."""
    resp = httpx.post(
        sandbox.token_url(practice),
        data={"grant_type": "client_credentials", "scope": scope},
        auth=("pfsync-sandbox", "sandbox-secret"),
    )
    resp.raise_for_status()
    return str(resp.json()["access_token"])


def assertion_form(assertion: str, scope: str = "system/*.read") -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion, "scope": scope}  # fmt: skip


def kickoff_headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def export_and_wait(
    sandbox: SourceSandbox,
    token: str,
    path: str = "/Patient/$export",
    params: dict[str, str] | None = None,
    practice: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Kick off, poll until 200; returns (status URL, manifest)."""
    resp = httpx.get(sandbox.base_url(practice) + path, params=params, headers=kickoff_headers(token))
    assert resp.status_code == 202, resp.text
    status_url = resp.headers["content-location"]
    for _ in range(200):
        poll = httpx.get(status_url, headers={"Authorization": f"Bearer {token}"})
        if poll.status_code == 200:
            return status_url, poll.json()
        assert poll.status_code == 202, poll.text
        time.sleep(0.02)
    raise AssertionError("export never completed")


def read_ndjson(url: str, token: str) -> list[dict[str, Any]]:
    resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    return [json_loads(line) for line in resp.content.splitlines() if line]


def json_loads(data: bytes) -> Any:
    import orjson

    return orjson.loads(data)
