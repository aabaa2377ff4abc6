"""The HTTP layer: one client factory, explicit bounded retries, and error text from OperationOutcomes.

Library classes take an `httpx.Client` (STYLE.md: the network is injected); only `make_client`
builds a real one. Sleeping and the clock are injected too (`Clock`), so retry tests run
instantly. Retries follow bulk-data.md / cumulus-fhir-support: 408, 429 and 5xx and network
errors are temporary; Retry-After is honoured in both forms (seconds and HTTP-date), clamped.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import orjson

from pfsync import __version__
from pfsync.errors import HTTPError
from pfsync.redact import redact
from pfsync.settings import HttpSettings

USER_AGENT = f"pfsync/{__version__}"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

# What an error answer means for the caller: "final" (interpret it), "retry" (within the retry
# budget, http.retries), "keep-polling" (an export still running: poll again on the poll schedule,
# until the export deadline rather than for a number of tries).
Verdict = Literal["final", "retry", "keep-polling"]


@dataclass(frozen=True)
class RetryRule:
    """One row of a classifier table: the statuses it covers and, optionally, the OperationOutcome
    issue code it needs (`code`), or that the body is not FHIR at all (`not_fhir`: a proxy's page)."""

    statuses: frozenset[int]
    verdict: Verdict
    code: str | None = None
    not_fhir: bool = False


_SERVER_ERRORS = frozenset(range(500, 600))
# bulk-data.md "Status polling" and "Download": an error OperationOutcome means the export failed,
# except 408, 429, gateway errors, a 5xx whose issue code is `transient`, and a 5xx that is not FHIR.
BULK_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({408, 429, 502, 503, 504}), "retry"),
    RetryRule(_SERVER_ERRORS, "retry", code="transient"),
    RetryRule(_SERVER_ERRORS, "retry", not_fhir=True),
)
# While polling a status URL, a 500 `transient` OperationOutcome says the job is still running (the
# SMART reference server answers it on every poll until the job completes: docs/bulk-data.md
# "Status polling"), so it is polled again until the export deadline, not retried a few times. A
# 429 there is the same job, polled later: its Retry-After is a minimum wait (the reference server
# blocks the route for 5 minutes and then names an absolute time that may already have passed).
STATUS_POLL_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({500}), "keep-polling", code="transient"),
    RetryRule(frozenset({429}), "keep-polling"),
    *BULK_RULES,
)


def outcome_codes(response: httpx.Response) -> set[str] | None:
    """The issue codes of an OperationOutcome body; None when the body is not one."""
    try:
        body = orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    return {str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, dict)}


def classify(response: httpx.Response, rules: tuple[RetryRule, ...]) -> Verdict:
    """The verdict of the first rule that matches `response` ("final" when none does)."""
    codes: set[str] | None = None
    parsed = False
    for rule in rules:
        if response.status_code not in rule.statuses:
            continue
        if rule.code is not None or rule.not_fhir:
            if not parsed:
                codes, parsed = outcome_codes(response), True
            if rule.not_fhir and codes is not None:
                continue
            if rule.code is not None and (codes is None or rule.code not in codes):
                continue
        return rule.verdict
    return "final"


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
    retry_if: Callable[[httpx.Response], bool] | None = None,
) -> httpx.Response:
    """Call `send` until it answers with a non-retryable status, retrying transient failures.

    `retry_if` replaces the `retry_status` test, e.g. `lambda r: classify(r, BULK_RULES) == "retry"`.

    Returns the final response (which may be an error status the caller interprets); raises
    HTTPError (temporary) when retries are exhausted on a network error or retryable status.
    """
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
            if on_retry:
                on_retry(attempt, wait, exc.__class__.__name__)
            clock.sleep(wait)
            continue
        if not (retry_if(response) if retry_if is not None else response.status_code in retry_status):
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
        if on_retry:
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
