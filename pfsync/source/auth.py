"""SMART Backend Services auth for an EHR source: discovery, client assertions, scopes, cached tokens.

docs/bulk-data.md "Auth" is the checklist: the token endpoint comes from `.well-known/smart-configuration`
(else the CapabilityStatement's oauth-uris extension, else the `source.token_url` override); the client
authenticates with a signed JWT (`private_key_jwt`) or HTTP Basic (`client_secret_basic`); tokens are
cached, renewed shortly before expiry, and renewed once more when a request meets a 401 mid-run.
Each `SourceAuthenticator` owns its endpoint, audience and token: several practices never share one.
Every token and assertion is registered with pfsync.core.redact, so no log line can show it.
Discovery is pfsync.source.discovery's, the scope syntax pfsync.source.scopes'; this module owns the
authenticator, the client's authentication method and what a refused token request means.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import httpx
import jwt
import orjson

from pfsync.core.errors import AuthError, ConfigError, HTTPError
from pfsync.core.redact import redact, register
from pfsync.core.settings import HttpSettings, SourceSettings, check_transport_url, require
from pfsync.net.http import Clock, RetryPolicy, SystemClock, outcome_text
from pfsync.net.tokens import (
    NO_AUTH,
    BearerAuth,
    CachedToken,
    Token,
    parse_token_response,
    token_request,
)
from pfsync.source.discovery import Discovery, capability_resource_types, discover, get_json
from pfsync.source.keys import SigningKey, load_signing_key
from pfsync.source.scopes import ScopeVersion, build_scopes, choose_scope_version, split_granted

log = logging.getLogger("pfsync.auth")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# docs/practice-fusion.md "Auth (system apps)": exp at most 300 s ahead; keep room for skew
ASSERTION_LIFETIME = 240
Method = Literal["private_key_jwt", "client_secret_basic"]


# ---------------------------------------------------------------------------------------------
# Tokens


def token_failure_hint(status: int, error: str, description: str, method: str) -> str:
    """What a refused token request most likely means, from the OAuth error and its text."""
    text = f"{error} {description}".lower()
    if error == "invalid_client" or (status == 401 and not error):
        if method == "client_secret_basic":
            return "wrong client id or secret (PF_CLIENT_ID / PF_CLIENT_SECRET)"
        return ("wrong client id (PF_CLIENT_ID), or the app (its JWKS) is not registered with / authorised "
                "by this practice")  # fmt: skip
    if error == "invalid_scope":
        return ("scope not authorised: ask the practice admin to authorise the app for these resource "
                "types, or narrow PF_RESOURCE_TYPES")  # fmt: skip
    if "registration" in text:
        # docs/bulk-data.md: "Registration token expired" is about the client's registration, not the clock.
        return ("the client registration has expired or is no longer valid: register the app again with "
                "the EHR and configure the new client id (PF_CLIENT_ID)")  # fmt: skip
    if "jti" in text:
        return ("the server refused the assertion's jti: pfsync sends a fresh random jti on every request, "
                "so the server or the app's registration refuses it; check the registration with the EHR")  # fmt: skip
    if "jwt expired" in text:
        return ("clock skew: the assertion had expired by the server's clock; sync this machine's clock "
                "(NTP)")  # fmt: skip
    if "kid" in text or "public key" in text or "jwks" in text:
        return ("the public key is not registered with the EHR, or PF_KEY_ID (kid) does not match a kid "
                "in the registered JWKS")  # fmt: skip
    if "signature" in text or "verify" in text:
        return "the private key does not match the registered public key (wrong key file or stale JWKS)"
    if any(word in text for word in ("expired", "'exp'", " exp ", "iat", "nbf", "clock", "future")):
        return ("clock skew: the assertion's exp must be at most 300 s ahead by the server's clock; "
                "sync this machine's clock (NTP)")  # fmt: skip
    if "aud" in text:
        return "the assertion's aud must equal the token endpoint: set PFSYNC_TOKEN_URL to the exact URL"
    if "scope" in text:
        return ("scope not authorised: ask the practice admin to authorise the app for these resource "
                "types, or narrow PF_RESOURCE_TYPES")  # fmt: skip
    if "grant_type" in text or error == "unsupported_grant_type":
        return "the server does not accept grant_type=client_credentials for this client"
    if method == "client_secret_basic" and (status == 401 or "client" in text or "secret" in text):
        return "wrong client id or secret (PF_CLIENT_ID / PF_CLIENT_SECRET)"
    if status == 401 or "client" in text:
        return ("wrong client id (PF_CLIENT_ID), or the app is not registered with / authorised by this "
                "practice")  # fmt: skip
    if status == 403:
        return "the app is not enabled for this practice: ask the practice admin to authorise it"
    if status in (404, 405):
        return "this URL is not a token endpoint: check PF_FHIR_BASE_URL or PFSYNC_TOKEN_URL"
    return "check the client id, the registered key or secret, and the requested scopes"


def token_error(response: httpx.Response, what: str, method: str) -> AuthError:
    """AuthError for a refused token request, carrying the OAuth error text and a hint."""
    error, description = "", ""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        error, description = str(body.get("error") or ""), str(body.get("error_description") or "")
    text = outcome_text(response) or (f"{error}: {description}" if error else "")
    message = f"{what}: token request refused with HTTP {response.status_code}" + (
        f": {text}" if text else ""
    )
    return AuthError(
        redact(message), hint=token_failure_hint(response.status_code, error, description, method)
    )


def resolve_method(source: SourceSettings) -> Method:
    """The client authentication method from what is configured (docs/bulk-data.md: both supported)."""
    where = f"source {source.name!r}"
    require(source.client_id, "source.client_id", where)
    method = source.auth_method
    if method == "auto":
        if source.private_key and source.client_secret:
            raise ConfigError(f"{where}: both a client secret and a private key are configured",
                              setting="source.auth_method",
                              hint="choose one with PFSYNC_AUTH_METHOD=private_key_jwt or client_secret_basic")  # fmt: skip
        if source.private_key:
            return "private_key_jwt"
        if source.client_secret:
            return "client_secret_basic"
        raise ConfigError(f"{where} has no credentials: neither a private key nor a client secret",
                          setting="source.private_key",
                          hint="set PF_PRIVATE_KEY (and PF_KEY_ID) for private_key_jwt, or PF_CLIENT_SECRET")  # fmt: skip
    if method == "private_key_jwt":
        require(source.private_key, "source.private_key", f"{where} with private_key_jwt")
    else:
        require(source.client_secret, "source.client_secret", f"{where} with client_secret_basic")
    return method


class SourceAuthenticator(CachedToken):
    """Tokens for one source: discovery on first use, cached, renewed before expiry; thread-safe."""

    def __init__(
        self,
        source: SourceSettings,
        client: httpx.Client,
        *,
        http: HttpSettings | None = None,
        clock: Clock | None = None,
        negotiate: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self._client = client
        self._http = http or HttpSettings()
        self._clock = clock or SystemClock()
        self._policy = RetryPolicy.from_settings(self._http)
        self.method: Method = resolve_method(source)
        self.client_id: str = str(source.client_id)
        self.signing_key: SigningKey | None = None
        if self.method == "private_key_jwt":
            assert source.private_key is not None
            self.signing_key = load_signing_key(source.private_key.reveal(), key_id=source.key_id)
        self._discovery: Discovery | None = None
        # The types requested in the scope: the configured ones, plus Group for a system-level
        # export (it is part of the system's data), minus the types the server says it does not
        # have (`negotiate`, off with export.strict_scopes: then such a refusal stays fatal).
        self.types: list[str] = list(dict.fromkeys(source.resource_types))
        if source.export_level == "system" and "Group" not in self.types:
            self.types.append("Group")
        self.unsupported_types: list[str] = []
        self.negotiate = negotiate
        self._capability_types: frozenset[str] | None = None
        self._told = False

    # -- discovery and scopes
    @property
    def discovery(self) -> Discovery:
        with self._lock:
            if self._discovery is None:
                found = discover(self._client, self.source.base_url, token_url=self.source.token_url,
                                 policy=self._policy, clock=self._clock)  # fmt: skip
                check_transport_url(found.token_endpoint, f"source {self.source.name!r} token endpoint",
                                    self._http.allow_insecure_http)  # fmt: skip
                self._discovery = found
            return self._discovery

    @property
    def token_endpoint(self) -> str:
        return self.discovery.token_endpoint

    @property
    def scope_version(self) -> ScopeVersion:
        caps = self.discovery.capabilities if self.source.scope_version == "auto" else ()
        return choose_scope_version(self.source.scope_version, caps)

    @property
    def requested_scopes(self) -> tuple[str, ...]:
        return build_scopes(self.types, self.scope_version)

    @property
    def granted_scopes(self) -> frozenset[str]:
        """Scopes of the latest token (empty before the first one)."""
        token = self.last_token
        return token.scopes if token else frozenset()

    def granted_types(self, requested: Sequence[str]) -> tuple[list[str], list[str]]:
        """(granted, not granted) among `requested` types and the ones added to the scope (Group at
        system level), from the latest token's scope."""
        return split_granted(self.granted_scopes, list(dict.fromkeys([*requested, *self.types])))

    # -- tokens
    def client_assertion(self, audience: str | None = None) -> str:
        """A freshly signed client assertion JWT (docs/bulk-data.md "Auth": header and claims)."""
        key = self.signing_key
        if key is None:
            raise ConfigError(f"source {self.source.name!r} has no private key for private_key_jwt",
                              setting="source.private_key")  # fmt: skip
        now = int(self._clock.now())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": audience or self.token_endpoint,
                  "exp": now + ASSERTION_LIFETIME, "jti": uuid.uuid4().hex}  # fmt: skip
        headers: dict[str, Any] = {"typ": "JWT", "kid": key.kid}
        if self.source.jku:
            headers["jku"] = self.source.jku
        assertion = jwt.encode(claims, key.key, algorithm=key.alg, headers=headers)
        register(assertion)
        return assertion

    def _fetch(self) -> Token:
        what = f"source {self.source.name!r}"
        while True:
            scopes = self.requested_scopes
            started = self._clock.now()
            response = self._request_token(scopes)
            if response.status_code == 200:
                break
            dropped = self._unsupported(response) if self.negotiate else []
            if not dropped:
                raise token_error(response, what, self.method)
            self.types = [t for t in self.types if t not in dropped]
            self.unsupported_types += dropped
            log.info(
                "source %s refused the scope of %s: asking again without",
                self.source.name,
                ", ".join(dropped),
            )
        if self.unsupported_types and not self._told:
            self._told = True
            log.warning(
                "source %s does not have %s: not requested (PFSYNC_STRICT_SCOPES=true refuses instead)",
                self.source.name, ", ".join(self.unsupported_types),
            )  # fmt: skip
        token = parse_token_response(response, scopes, started, what)
        granted, missing = split_granted(token.scopes, self.source.resource_types)
        detail = {"source": self.source.name, "expiresIn": int(token.lifetime), "grantedTypes": len(granted),
                  "missing": list(missing)}  # fmt: skip
        log.info(
            "auth_token source=%s expires_in=%ds granted_types=%d missing=%s",
            self.source.name, int(token.lifetime), len(granted), ",".join(missing) or "none",
            extra={"event": "auth_token", "eventDetail": detail},
        )  # fmt: skip
        return token

    def _request_token(self, scopes: Sequence[str]) -> httpx.Response:
        endpoint = self.token_endpoint

        def send() -> httpx.Response:
            self.token_requests += 1
            form = {"grant_type": "client_credentials", "scope": " ".join(scopes)}
            auth: httpx.Auth = NO_AUTH
            if self.method == "private_key_jwt":
                # A fresh assertion per attempt: a retried jti would be refused as a replay.
                form["client_assertion_type"] = JWT_BEARER
                form["client_assertion"] = self.client_assertion(endpoint)
            else:
                assert self.source.client_secret is not None
                auth = httpx.BasicAuth(self.client_id, self.source.client_secret.reveal())
            return self._client.post(endpoint, data=form, auth=auth, headers={"Accept": "application/json"})

        return token_request(send, f"source {self.source.name!r}", endpoint, self._policy, self._clock)

    def _unsupported(self, response: httpx.Response) -> list[str]:
        """The requested types a 400 `invalid_scope` refuses because the server does not have them:
        those its text names (the SMART reference server: 'Resources of type "X" do not exist on
        this server'), else those its CapabilityStatement does not list. Empty: not that kind of
        refusal, or nothing would be left to request."""
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return []
        if response.status_code != 400 or not isinstance(body, dict) or body.get("error") != "invalid_scope":
            return []
        text = str(body.get("error_description") or "")
        named = [t for t in self.types if re.search(rf"(?<![A-Za-z]){re.escape(t)}(?![A-Za-z])", text)]
        if not named:
            listed = self.capability_types()
            named = [t for t in self.types if listed and t not in listed]
        return named if len(named) < len(self.types) else []

    def capability_types(self) -> frozenset[str]:
        """The resource types the source's CapabilityStatement lists (empty when it lists none).
        Only a hint: the SMART reference server leaves out types it does export (docs/bulk-data.md, recorded case 02)."""
        if self._capability_types is None:
            doc = None
            with contextlib.suppress(HTTPError, httpx.HTTPError):
                doc = get_json(self._client, f"{self.source.base_url.rstrip('/')}/metadata",
                                "application/fhir+json", self._policy, self._clock)  # fmt: skip
            self._capability_types = capability_resource_types(doc)
        return self._capability_types


# ---------------------------------------------------------------------------------------------
# httpx integration


def source_auth(
    source: SourceSettings,
    client: httpx.Client,
    *,
    http: HttpSettings | None = None,
    clock: Clock | None = None,
    extra_origins: Iterable[str] = (),
    negotiate: bool = True,
) -> tuple[SourceAuthenticator, BearerAuth]:
    """The authenticator of a source and the httpx.Auth that applies it to the source's own origins.
    `negotiate`: drop requested types the server does not have (pass not export.strict_scopes)."""
    authenticator = SourceAuthenticator(source, client, http=http, clock=clock, negotiate=negotiate)
    origins = [source.base_url, *source.download_allowlist, *extra_origins]
    allow_http = (http or HttpSettings()).allow_insecure_http
    for origin in origins[1:]:  # the token must not travel in clear text to an extra origin either
        check_transport_url(origin, f"source {source.name!r} download allowlist", allow_http)
    return authenticator, BearerAuth(authenticator, origins=origins)
