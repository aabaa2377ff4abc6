"""Shared fakes and key material for the auth tests (no tests here; the test_auth* modules import it)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pfsync.core.redact import Secret
from pfsync.core.settings import SourceSettings

BASE = "https://ehr.example.com/fhir/r4/v1/practice-a"
TOKEN_URL = f"{BASE}/token"
SMART_URL = f"{BASE}/.well-known/smart-configuration"
METADATA_URL = f"{BASE}/metadata"


@dataclass
class FakeClock:
    """Time that moves only when told to (or when something sleeps)."""

    t: float = 1_700_000_000.0
    sleeps: list[float] = field(default_factory=list)

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@functools.cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(curve: str = "P-384") -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                                           "P-521": ec.SECP521R1()}  # fmt: skip
    return ec.generate_private_key(curves[curve])


def pem(key: Any, fmt: str = "pkcs8") -> str:
    formats = {"pkcs8": serialization.PrivateFormat.PKCS8,
               "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL}  # fmt: skip
    pem: bytes = key.private_bytes(serialization.Encoding.PEM, formats[fmt], serialization.NoEncryption())
    return pem.decode()


def smart_config(token_url: str = TOKEN_URL, v2: bool = True) -> dict[str, Any]:
    caps = ["client-confidential-asymmetric", "permission-v1"] + (["permission-v2"] if v2 else [])
    return {"token_endpoint": token_url, "capabilities": caps,
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"]}  # fmt: skip


def token_body(
    token: str = "tok-1", scope: str | None = "system/*.rs", expires_in: int = 300
) -> dict[str, Any]:
    body: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
    if scope is not None:
        body["scope"] = scope
    return body


def jwt_source(**overrides: Any) -> SourceSettings:
    base = SourceSettings(name="practice-a", base_url=BASE, client_id="client-a",
                          private_key=Secret(pem(rsa_key())), key_id="kid-a",
                          resource_types=("Patient", "Observation"))  # fmt: skip
    return replace(base, **overrides)


def basic_source(**overrides: Any) -> SourceSettings:
    base = SourceSettings(name="practice-a", base_url=BASE, client_id="client-a",
                          client_secret=Secret("s3cret-value"), resource_types=("Patient", "Observation"))  # fmt: skip
    return replace(base, **overrides)


class Responder:
    """A pytest-httpx callback that answers from a list and notes each Authorization header as sent
    (httpx retries with the same Request object, so get_requests() would show only the last header)."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.seen: list[str] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.headers.get("authorization", ""))
        self.bodies.append(request.read())
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
