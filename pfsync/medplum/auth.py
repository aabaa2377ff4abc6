"""Medplum (target) auth: one cached client_credentials token, renewed before expiry or after a 401.

docs/medplum.md "Base URLs and auth": `POST {base}oauth2/token` with `grant_type=client_credentials` and the
ClientApplication's id and secret as form fields (docs/medplum.md, recorded case 01); tokens live 1 h by default and
come without a refresh token; every token request creates a Login record and auth endpoints allow
160 requests/min per IP, so a token is never requested per call. Token errors are 400
`invalid_request` with an `error_description` (docs/medplum.md, recorded cases 03-05), not 401. HTTP Basic on each FHIR
call is the fallback (`medplum.auth = "basic"`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
from collections.abc import Generator

import httpx
import orjson

from pfsync.core.errors import AuthError
from pfsync.core.netpolicy import shown_url
from pfsync.core.redact import redact
from pfsync.core.settings import HttpSettings, MedplumSettings, require
from pfsync.net.http import Clock, RetryPolicy, SystemClock, make_client, outcome_text
from pfsync.net.tokens import (
    NO_AUTH,
    BearerAuth,
    CachedToken,
    Token,
    origin_of,
    parse_token_response,
    token_request,
)

log = logging.getLogger("pfsync.medplum_auth")


def medplum_token_hint(description: str) -> str:
    """What a refused Medplum token request means (docs/medplum.md, recorded cases 03-05 give the exact texts)."""
    text = description.lower()
    if "secret" in text:
        return "wrong MEDPLUM_CLIENT_SECRET for this ClientApplication"
    if "client" in text:
        return "unknown MEDPLUM_CLIENT_ID on this Medplum server (check MEDPLUM_BASE_URL and the client id)"
    return "check MEDPLUM_BASE_URL, MEDPLUM_CLIENT_ID and MEDPLUM_CLIENT_SECRET"


class MedplumAuthenticator(CachedToken):
    """The Medplum client_credentials token: fetched once, reused, renewed shortly before it expires."""

    def __init__(
        self,
        settings: MedplumSettings,
        client: httpx.Client,
        *,
        http: HttpSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.client_id: str = require(settings.client_id, "medplum.client_id", "Medplum auth")
        self._secret = require(settings.client_secret, "medplum.client_secret", "Medplum auth")
        self._client = client
        self._clock = clock or SystemClock()
        self._policy = RetryPolicy.from_settings(http or HttpSettings())

    @property
    def token_endpoint(self) -> str:
        return self.settings.token_url

    def _fetch(self) -> Token:
        url = self.token_endpoint
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self._secret.reveal()}  # fmt: skip

        def send() -> httpx.Response:
            self.token_requests += 1
            return self._client.post(url, data=form, auth=NO_AUTH, headers={"Accept": "application/json"})

        started = self._clock.now()
        # 429 (the 160/min auth limit) and 5xx are retried with backoff; 400 is final.
        response = token_request(send, "Medplum", url, self._policy, self._clock)
        if response.status_code != 200:
            try:
                body = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                body = None
            description = str(body.get("error_description") or "") if isinstance(body, dict) else ""
            text = outcome_text(response)
            raise AuthError(
                redact(f"Medplum token request to {shown_url(url)} refused with HTTP {response.status_code}"
                       + (f": {text}" if text else "")),
                hint=medplum_token_hint(description),
            )  # fmt: skip
        token = parse_token_response(response, (), started, "Medplum")
        log.info("auth_token target=medplum expires_in=%ds", int(token.lifetime),
                 extra={"event": "auth_token", "eventDetail": {"target": "medplum", "expiresIn": int(token.lifetime)}})  # fmt: skip
        return token


class OriginBasicAuth(httpx.Auth):
    """HTTP Basic client_id:secret on requests to Medplum's origin only (docs/medplum.md: Basic on FHIR calls)."""

    def __init__(self, client_id: str, secret: str, *, origins: list[str]) -> None:
        self._basic = httpx.BasicAuth(client_id, secret)
        self.origins = frozenset(origin_of(o) for o in origins)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin_of(request.url) in self.origins:
            yield from self._basic.auth_flow(request)
        else:
            yield request


# Keyed by id(clock) (a clock need not be hashable) with the clock kept in the entry: an id is only
# reused once its object is collected, which the entry prevents, and a lookup checks the clock is
# the very same object. None (the system clock) is one key.
_shared: dict[tuple[str, str, str, int], tuple[Clock | None, MedplumAuthenticator]] = {}
_shared_lock = threading.Lock()
_owned_clients: list[httpx.Client] = []


def shared_authenticator(
    settings: MedplumSettings, *, http: HttpSettings | None = None, clock: Clock | None = None
) -> MedplumAuthenticator:
    """The process's one authenticator for this Medplum server and client: every source, the state
    store and every thread share its token, renewed only near expiry (docs/medplum.md: 160 token
    requests a minute per client address, shared by every process behind it). It owns its own
    HTTP client, so no caller's closing can break a later renewal."""
    http = http or HttpSettings()
    client_id = str(require(settings.client_id, "medplum.client_id", "Medplum auth"))
    secret = require(settings.client_secret, "medplum.client_secret", "Medplum auth")
    digest = hashlib.sha256(secret.reveal().encode()).hexdigest()
    key = (settings.token_url, client_id, digest, id(clock))
    with _shared_lock:
        found = _shared.get(key)
        if found is None or found[0] is not clock:
            client = make_client(http)
            if not _owned_clients:
                atexit.register(_close_owned)
            _owned_clients.append(client)
            found = _shared[key] = (clock, MedplumAuthenticator(settings, client, http=http, clock=clock))
        return found[1]


def _close_owned() -> None:
    for client in _owned_clients:
        client.close()


def medplum_auth(
    settings: MedplumSettings,
    client: httpx.Client | None = None,
    *,
    clock: Clock | None = None,
    http: HttpSettings | None = None,
) -> httpx.Auth:
    """The httpx.Auth for Medplum FHIR calls: a bearer token, or Basic when configured. Without a
    `client`, the token is the process's shared one (`shared_authenticator`); with one (tests),
    a private authenticator requests its tokens through it."""
    origins = [settings.base_url]
    if settings.auth == "basic":
        client_id = require(settings.client_id, "medplum.client_id", "Medplum Basic auth")
        secret = require(settings.client_secret, "medplum.client_secret", "Medplum Basic auth")
        return OriginBasicAuth(client_id, secret.reveal(), origins=origins)
    authenticator = (
        shared_authenticator(settings, http=http, clock=clock)
        if client is None
        else MedplumAuthenticator(settings, client, http=http, clock=clock)
    )
    return BearerAuth(authenticator, origins=origins)
