"""The HTTP layer: one client factory, explicit bounded retries, and error text from OperationOutcomes.

Library classes take an `httpx.Client` (STYLE.md: the network is injected); only `make_client`
builds a real one. Sleeping and the clock are injected too (`Clock`), so retry tests run
instantly. Retries follow bulk-data.md / cumulus-fhir-support: 408, 429 and 5xx and network
errors are temporary; Retry-After is honoured in both forms (seconds and HTTP-date), clamped.
"""

from __future__ import annotations

import email.utils
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson

from pfsync import __version__
from pfsync.errors import HTTPError
from pfsync.redact import redact
from pfsync.settings import HttpSettings

_log = logging.getLogger("pfsync.http")

USER_AGENT = f"pfsync/{__version__}"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Clock(Protocol):
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall-clock time (epoch seconds) and real sleeping."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


def make_client(settings: HttpSettings, *, timeout: float | None = None, **kwargs: Any) -> httpx.Client:
    """The one place a real httpx.Client is built: TLS verification always on (optionally with a
    CA bundle), our User-Agent, and redirects followed (httpx drops Authorization on a redirect to
    another origin, so a signed-storage redirect never receives the token)."""
    # An SSLContext rather than a path: httpx deprecates verify=<str>. Verification stays on either way.
    verify: Any = ssl.create_default_context(cafile=str(settings.ca_bundle)) if settings.ca_bundle else True
    t = timeout if timeout is not None else settings.timeout
    return httpx.Client(
        verify=verify,
        timeout=httpx.Timeout(t, connect=min(t, 30.0)),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=True,
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        **kwargs,
    )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    Some servers send epoch values (the SMART reference server sends epoch ms, then epoch s:
    transcripts/bulk-data-server README); a huge number that looks like an epoch is read as one.
    """
    if not value:
        return None
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - now)
    if number > 1e12:  # epoch milliseconds
        return max(0.0, number / 1000.0 - now)
    if number > 1e9:  # epoch seconds
        return max(0.0, number - now)
    return max(0.0, number)


def outcome_text(response: httpx.Response) -> str | None:
    """The human text of an OperationOutcome body (details.text, diagnostics), or of an OAuth error."""
    try:
        body = orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        text = response.text.strip()
        return redact(text[:300]) if text else None
    return outcome_from_json(body)


def outcome_from_json(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    if body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = (issue.get("details") or {}).get("text") or issue.get("diagnostics") or issue.get("code")
            if text:
                parts.append(str(text))
        return redact("; ".join(parts)) if parts else None
    if "error" in body:  # OAuth2 error response (RFC 6749 5.2)
        desc = body.get("error_description")
        return redact(f"{body['error']}: {desc}" if desc else str(body["error"]))
    return None


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6
    max_wait: float = 120.0
    base: float = 0.5

    @classmethod
    def from_settings(cls, settings: HttpSettings) -> RetryPolicy:
        return cls(retries=settings.retries, max_wait=settings.retry_max_wait)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter for the attempt-th retry (1-based)."""
        raw = self.base * (2 ** (attempt - 1))
        return float(min(self.max_wait, raw * (0.75 + random.random() / 2)))


def request_with_retry(
    send: Callable[[], httpx.Response],
    *,
    method: str,
    url: str,
    policy: RetryPolicy,
    clock: Clock,
    retry_status: frozenset[int] = RETRYABLE_STATUS,
    on_retry: Callable[[int, float, str], None] | None = None,
) -> httpx.Response:
    """Call `send` until it answers with a non-retryable status, retrying transient failures.

    Returns the final response (which may be an error status the caller interprets); raises
    HTTPError (temporary) when retries are exhausted on a network error or retryable status.
    """

    def log_retry(attempt: int, wait: float, reason: str) -> None:
        # A wait is never silent: an unreachable host would look like a hang.
        _log.warning("http_retry %s %s: %s; retry %d of %d in %.1f s", method, redact(url), reason, attempt,
                     policy.retries, wait, extra={"event": "http_retry"})  # fmt: skip

    on_retry = on_retry or log_retry
    attempt = 0
    while True:
        try:
            response = send()
        except httpx.TransportError as exc:
            attempt += 1
            if attempt > policy.retries:
                raise HTTPError(
                    f"{method} {redact(url)} failed after {policy.retries} retries: {exc.__class__.__name__}: "
                    f"{redact(str(exc))}",
                    method=method,
                    url=url,
                ) from None
            wait = policy.backoff(attempt)
            on_retry(attempt, wait, exc.__class__.__name__)
            clock.sleep(wait)
            continue
        if response.status_code not in retry_status:
            return response
        attempt += 1
        if attempt > policy.retries:
            raise HTTPError(
                f"{method} {redact(url)} answered {response.status_code} after {policy.retries} retries"
                + (f": {text}" if (text := outcome_text(response)) else ""),
                method=method,
                url=url,
                status=response.status_code,
                outcome=outcome_text(response),
            )
        hinted = parse_retry_after(response.headers.get("Retry-After"), clock.now())
        wait = min(policy.max_wait, hinted) if hinted is not None else policy.backoff(attempt)
        on_retry(attempt, wait, f"HTTP {response.status_code}")
        response.close()
        clock.sleep(wait)


def http_error(response: httpx.Response, what: str) -> HTTPError:
    """An HTTPError for an error response, carrying its OperationOutcome text (redacted URL)."""
    text = outcome_text(response)
    req = response.request
    return HTTPError(
        f"{what}: {req.method} {redact(str(req.url))} answered {response.status_code}"
        + (f": {text}" if text else ""),
        method=req.method,
        url=str(req.url),
        status=response.status_code,
        outcome=text,
    )


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Turn an error response into an HTTPError carrying the OperationOutcome text."""
    if not response.is_success:
        raise http_error(response, what)
