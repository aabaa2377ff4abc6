"""OAuth 2 token plumbing both sides share: the token record and its renewal rule, the token
cache with one renewal at a time, the token POST through the one request path, and the httpx.Auth
that puts a bearer token on requests to the allowed origins only.

The source (SMART Backend Services, pfsync.source.auth) and Medplum (client credentials,
pfsync.medplum.auth) each build on it; neither knows the other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import orjson

from pfsync.core.errors import AuthError, ProtocolError
from pfsync.core.redact import register
from pfsync.net.http import Clock, RetryPolicy, request_with_retry

log = logging.getLogger("pfsync.auth")

DEFAULT_TOKEN_LIFETIME = 300.0  # SMART Backend Services: tokens "should" live at most 5 minutes
MAX_RENEW_MARGIN = 60.0
# Explicitly no auth: the client may carry a BearerAuth, which must never wrap a token request.
NO_AUTH = httpx.Auth()


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    obtained_at: float
    expires_at: float
    scopes: frozenset[str]

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    def fresh(self, now: float) -> bool:
        """Still good for a while: renew at 80% of the lifetime, at most 60 s before expiry."""
        margin = min(MAX_RENEW_MARGIN, self.lifetime / 5)
        return now < self.expires_at - margin


def parse_token_response(response: httpx.Response, requested: Sequence[str], now: float, what: str) -> Token:
    """A Token from a 200 token response (RFC 6749 5.1); AuthError when it is not one."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    value = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise AuthError(f"{what}: the token endpoint answered 200 without an access_token",
                        hint="is the token URL right? It must be the OAuth token endpoint")  # fmt: skip
    register(value)
    assert isinstance(body, dict)
    if "id_token" in body and isinstance(body["id_token"], str):
        register(body["id_token"])
    token_type = str(body.get("token_type") or "Bearer")
    if token_type.lower() != "bearer":
        raise AuthError(f"{what}: unsupported token_type {token_type!r} (expected Bearer)")
    try:
        lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
    except (TypeError, ValueError):
        lifetime = DEFAULT_TOKEN_LIFETIME
    scope = body.get("scope")
    # RFC 6749 5.1: the server may omit `scope` when it granted exactly what was asked.
    scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset(requested)
    return Token(value=value, obtained_at=now, expires_at=now + max(lifetime, 1.0), scopes=scopes)


def token_request(
    send: Callable[[], httpx.Response], what: str, endpoint: str, policy: RetryPolicy, clock: Clock
) -> httpx.Response:
    """A token POST through the one retry path: 429 (an auth rate limit) and 5xx waited out; a
    redirect is never followed (the form carries the credentials: pfsync.net.http.RequestGuard) and
    is an auth failure naming where it pointed."""
    try:
        return request_with_retry(send, method="POST", url=endpoint, policy=policy, clock=clock)
    except ProtocolError as exc:
        raise AuthError(f"{what}: token request refused: {exc.message}",
                        hint="set the token URL to the final endpoint (PFSYNC_TOKEN_URL, or MEDPLUM_BASE_URL "
                        "for Medplum); credentials are never re-sent to a redirect's target") from None  # fmt: skip


_current_run = 0
_run_lock = threading.Lock()


def begin_run() -> None:
    """Start a new run (one `pfsync sync` invocation, or one cycle of `--every`): the next `prove()`
    of every token cache requests a fresh token, so each run proves its credentials once even
    when the process keeps one shared token between runs."""
    global _current_run
    with _run_lock:
        _current_run += 1


class TokenProvider(Protocol):
    def token(self, *, force: bool = False) -> str: ...
    def prove(self) -> str: ...
    def invalidate(self, token: str) -> None: ...


class CachedToken:
    """The token cache both authenticators share: reuse until shortly before expiry, renew under a
    lock so parallel downloads fetch one token, and forget only the token a server refused.
    Subclasses set `_clock` and implement `_fetch()`."""

    _clock: Clock

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._token: Token | None = None
        self.last_token: Token | None = None
        self.token_requests = 0
        self._proven_run = -1

    def _fetch(self) -> Token:
        raise NotImplementedError

    def prove(self) -> str:
        """The token, requested anew the first time in each run (`begin_run`): a revoked secret
        fails the run even while a cached token would still be accepted; shared after that."""
        with self._lock:
            if self._proven_run != _current_run:
                token = self.token(force=True)
                self._proven_run = _current_run
                return token
            return self.token()

    def token(self, *, force: bool = False) -> str:
        """A valid access token: the cached one unless it is about to expire (or `force`)."""
        with self._lock:
            current = self._token
            if current is not None and not force and current.fresh(self._clock.now()):
                return current.value
            self._token = self._fetch()
            self.last_token = self._token
            return self._token.value

    def invalidate(self, token: str) -> None:
        """Forget `token` (a server refused it); a newer token fetched by another thread is kept."""
        with self._lock:
            if self._token is not None and self._token.value == token:
                self._token = None


def origin_of(url: str | httpx.URL) -> str:
    """scheme://host:port with the default port filled in (so https://h and https://h:443 match)."""
    u = httpx.URL(url) if isinstance(url, str) else url
    port = u.port or {"http": 80, "https": 443}.get(u.scheme, 0)
    return f"{u.scheme}://{u.host}:{port}".lower()


class BearerAuth(httpx.Auth):
    """Bearer token on requests to the allowed origins only; one renewal and retry on a 401.

    docs/bulk-data.md "Download": never send the token to foreign storage origins. httpx replays the same
    request after a 401 (request bodies must be bytes, not one-shot streams); for streamed
    responses the 401 is read and closed and the retried response is handed back unread.
    """

    def __init__(self, provider: TokenProvider, *, origins: Iterable[str]) -> None:
        self.provider = provider
        self.origins = frozenset(origin_of(o) for o in origins)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin_of(request.url) not in self.origins:
            yield request
            return
        token = self.provider.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        # A token refused before its expiry means trouble (revoked, clock, another instance):
        # a warning with a stable event, so an alert on level >= warning sees it.
        where = origin_of(request.url)
        log.warning("auth_retry a request to %s got 401: renewing the token once", where,
                    extra={"event": "auth_retry", "eventDetail": {"origin": where, "status": 401}})  # fmt: skip
        self.provider.invalidate(token)
        request.headers["Authorization"] = f"Bearer {self.provider.token()}"
        yield request
