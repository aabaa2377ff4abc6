"""Clients and tokens of the target sandbox (docs/medplum.md "Base URLs and auth", recorded cases 01-07).

Tokens are HS256 JWTs signed with a key kept in the store, so they stay valid across a restart on the
same state_dir, as Medplum's do. "Expire all tokens now" moves a not-before mark instead of a key.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import jwt

from pfsync.sandbox.target.common import Json
from pfsync.sandbox.target.quota import Quota

_NS = uuid.UUID("6f1c1c0e-5b7a-4a4e-9d64-0c4c7a1f3b21")


@dataclass
class Client:
    client_id: str
    secret: str
    quota: Quota
    name: str
    # Medplum ids are UUIDs: author/profile references carry them (docs/medplum.md, recorded case 39 meta.author).
    app_id: str = ""
    project_id: str = ""
    project_name: str = ""
    token_lifetime: int = 3600
    tokens_issued: int = field(default=0)

    def __post_init__(self) -> None:
        self.app_id = self.app_id or str(uuid.uuid5(_NS, "app:" + self.client_id))
        self.project_id = self.project_id or str(uuid.uuid5(_NS, "project:" + self.client_id))
        self.project_name = self.project_name or self.name


class TokenError(Exception):
    """A token request failed: always 400 invalid_request (docs/medplum.md, recorded cases 03-05)."""


class Auth:
    def __init__(self, signing_key: str, token_lifetime: int) -> None:
        self._key = signing_key
        self.token_lifetime = token_lifetime
        self.clients: dict[str, Client] = {}
        self.not_before = 0.0
        self._lock = threading.Lock()

    def add(self, client: Client) -> None:
        with self._lock:
            self.clients[client.client_id] = client

    def expire_all(self) -> None:
        """Fault: every token issued so far is rejected from now on."""
        self.not_before = time.time()

    # ------------------------------------------------------------------ token endpoint
    def token(self, body: bytes, authorization: str) -> tuple[Client, str]:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        basic = _basic(authorization)
        client_id, secret = basic if basic else (form.get("client_id", ""), form.get("client_secret", ""))
        grant = form.get("grant_type")
        if not grant:
            raise TokenError("Missing grant_type")
        if grant != "client_credentials":
            raise TokenError("Unsupported grant type")
        if not client_id:
            raise TokenError("Missing client_id")
        client = self.clients.get(client_id)
        if client is None:
            raise TokenError("Invalid client")
        if not secrets.compare_digest(client.secret, secret):
            raise TokenError("Invalid secret")
        return client, self._issue(client)

    def _issue(self, client: Client) -> str:
        now = time.time()
        claims = {
            "sub": client.client_id,
            "cid": client.client_id,
            "iat": now,
            "jti": secrets.token_hex(8),
            "exp": now + client.token_lifetime,
            "scope": "openid",
        }
        client.tokens_issued += 1
        return jwt.encode(claims, self._key, algorithm="HS256")

    def token_response(self, client: Client, token: str, base: str) -> Json:
        # Same members as docs/medplum.md, recorded case 01 (the replay tool compares member names).
        return {
            "token_type": "Bearer",
            "expires_in": client.token_lifetime,
            "scope": "openid",
            "id_token": token,
            "access_token": token,
            "project": {"reference": f"Project/{client.project_id}", "display": client.project_name},
            "profile": {"reference": f"ClientApplication/{client.app_id}", "display": client.name},
            "smart_style_url": f"{base}fhir/R4/.well-known/smart-styles.json",
            "need_patient_banner": False,
        }

    # ------------------------------------------------------------------ FHIR calls
    def authenticate(self, authorization: str) -> Client | None:
        """Bearer token or HTTP Basic client_id:secret (docs/medplum.md: Basic works on every FHIR call)."""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "basic":
            basic = _basic(authorization)
            if basic is None:
                return None
            client = self.clients.get(basic[0])
            return client if client and secrets.compare_digest(client.secret, basic[1]) else None
        if scheme.lower() != "bearer" or not value:
            return None
        try:
            claims = jwt.decode(value.strip(), self._key, algorithms=["HS256"])
        except jwt.PyJWTError:
            return None
        if float(claims.get("iat", 0)) < self.not_before:
            return None
        return self.clients.get(str(claims.get("cid", "")))


def _basic(authorization: str) -> tuple[str, str] | None:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else None
