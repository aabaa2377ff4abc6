"""The HTTP layer: one client factory, one retry path, and error text from OperationOutcomes.

Library classes take an `httpx.Client` (the network is injected); only `make_client`
builds a real one, and every client it builds applies RequestGuard on every hop: the URL rules
of pfsync.core.netpolicy, no redirect for a request carrying a body or credentials, attachments
pinned to their origin; proxy and CAs from pfsync's settings, not the environment. Sleeping and
the clock are injected too (`Clock`), so retry tests run instantly.

Retries follow docs/bulk-data.md / cumulus-fhir-support and are decided in one place, `Retrier`
(used by `request_with_retry`, pfsync.medplum.client and the download resume loop): network
errors and the answers a classifier table names (`decide`; TEMPORARY_RULES: 408, 429, 5xx; the
Bulk Data and batch-entry tables beside it) are temporary; the wait is Retry-After in both forms
(seconds and HTTP-date) or Medplum's msBeforeNext or spent RateLimit window, capped, else
backoff; waits end on SIGTERM. What a server sends reaches a message only through `server_text`
(redacted, capped, no control characters), URLs through `shown_url` (no query). Answers that
must be JSON objects go through `json_object`, Bundle paging through `next_link`, streamed
bodies through `iter_decoded` (bounded inflation).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
import orjson

from pfsync import __version__
from pfsync.core.errors import (
    TEMPORARY_STATUS,
    ConfigError,
    HTTPError,
    InterruptedRunError,
    PfsyncError,
    ProtocolError,
)
from pfsync.core.netpolicy import Network, origin, parse_networks, resolved_problem, shown_url, url_problem
from pfsync.core.redact import redact, register
from pfsync.core.settings import HttpSettings
from pfsync.net.pacing import parse_ratelimit

USER_AGENT = f"pfsync/{__version__}"
log = logging.getLogger("pfsync.http")

# What an error answer means for the caller: "final" (interpret it), "retry" (within the retry
# budget, http.retries), "keep-polling" (an export still running: poll again on the poll schedule,
# until the export deadline rather than for a number of tries), "wait-out" (the server says "not
# now": wait what its Retry-After asks in full, not capped at http.retry_max_wait, as long as the
# export deadline allows; within the retry budget).
Verdict = Literal["final", "retry", "keep-polling", "wait-out"]


@dataclass(frozen=True)
class RetryRule:
    """One row of a classifier table: the statuses it covers and, optionally, the OperationOutcome
    issue code it needs (`code`), text its outcome must contain (`text`), or that the body is not
    FHIR at all (`not_fhir`: a proxy's page)."""

    statuses: frozenset[int]
    verdict: Verdict
    code: str | None = None
    not_fhir: bool = False
    text: str | None = None


_SERVER_ERRORS = frozenset(range(500, 600))
# docs/bulk-data.md "Status polling" and "Download": an error OperationOutcome means the export failed,
# except 408, 429, gateway errors, a 5xx whose issue code is `transient`, and a 5xx that is not FHIR.
BULK_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({408, 429, 502, 503, 504}), "retry"),
    RetryRule(_SERVER_ERRORS, "retry", code="transient"),
    RetryRule(_SERVER_ERRORS, "retry", not_fhir=True),
)
# docs/bulk-data.md "Download": a file download retries 408, 429 and every 5xx (a file's bytes are
# not a job's outcome: any server error there is worth another try).
DOWNLOAD_RULES: tuple[RetryRule, ...] = (RetryRule(_SERVER_ERRORS, "retry"), *BULK_RULES)
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
# A 429 to an export kick-off asks for a later kick-off, however much later (the SMART reference
# server blocks the route for 5 minutes, docs/bulk-data.md "Retries and Retry-After"): waited out
# up to the export deadline (pfsync.source.bulk.kickoff) instead of failing after a few capped waits.
KICKOFF_RULES: tuple[RetryRule, ...] = (RetryRule(frozenset({429}), "wait-out"), *BULK_RULES)


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
    return decide(response.status_code, rules, lambda: (outcome_codes(response), outcome_text(response)))


def decide(
    status: int, rules: tuple[RetryRule, ...], outcome: Callable[[], tuple[set[str] | None, str | None]]
) -> Verdict:
    """The verdict of the first rule that matches `status` and, where a rule asks, the answer's
    OperationOutcome: `outcome()` gives its issue codes (None: the body is not one) and its text,
    read only when a rule needs them. The one classifier: `classify` applies it to an HTTP answer,
    pfsync.medplum.batch to one entry of a batch-response."""
    codes: set[str] | None = None
    text: str | None = None
    parsed = False
    for rule in rules:
        if status not in rule.statuses:
            continue
        if rule.code is not None or rule.not_fhir or rule.text is not None:
            if not parsed:
                (codes, text), parsed = outcome(), True
            if rule.not_fhir and codes is not None:
                continue
            if rule.code is not None and (codes is None or rule.code not in codes):
                continue
            if rule.text is not None and rule.text not in (text or ""):
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


MAX_REDIRECTS = 5
# Request extension naming the origin a request and all its redirects must stay on (attachments).
PIN_ORIGIN = "pfsync_pin_origin"
# Request extension: the caller streams and bounds the body itself (iter_decoded; export files,
# attachments), so http.max_response_bytes does not apply.
STREAMED = "pfsync_streamed"
_SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class RequestGuard:
    """pfsync.core.netpolicy on every hop of every request, and the redirect rules, as httpx event hooks
    (httpx calls request hooks for each hop of a redirect chain, response hooks for each answer).

    A redirect is followed only for a GET or HEAD without a body and without Basic credentials:
    a token POST, a Bundle or an upload answered with 307/308 would otherwise re-send its secrets
    or data to wherever the Location points. A bearer token never follows a redirect to another
    origin (httpx drops Authorization there; pfsync.net.tokens.BearerAuth adds it only for allowed
    origins). A request carrying PIN_ORIGIN may not be redirected off that origin."""

    allow_insecure_http: bool = False
    allow_networks: tuple[Network, ...] = ()
    max_response_bytes: int | None = None

    def check_url(self, url: str, what: str) -> None:
        problem = url_problem(
            url, allow_insecure_http=self.allow_insecure_http, allow_networks=self.allow_networks
        )
        if problem is not None:
            raise ProtocolError(
                f"{what} {shown_url(url)} refused: {problem}",
                hint="a server handed pfsync this URL; if the address is really meant, add its range to "
                "PFSYNC_ALLOW_NETWORKS (or use https)",
            )

    def on_request(self, request: httpx.Request) -> None:
        url = str(request.url)
        self.check_url(url, "request to")
        problem = resolved_problem(url, allow_networks=self.allow_networks)
        if problem is not None:
            raise ProtocolError(f"request to {shown_url(url)} refused: {problem}",
                                hint="if the address is really meant, add its range to PFSYNC_ALLOW_NETWORKS")  # fmt: skip

    def on_response(self, response: httpx.Response) -> None:
        if not response.has_redirect_location:
            self._bound(response)
            return
        request = response.request
        target = str(request.url.join(response.headers["Location"]))
        where = f"{request.method} {shown_url(str(request.url))} answered {response.status_code}, a redirect to {shown_url(target)}"
        basic = request.headers.get("Authorization", "").lower().startswith("basic ")
        has_body = bool(
            request.headers.get("Content-Length", "0") not in ("", "0")
            or request.headers.get("Transfer-Encoding")
        )
        if request.method not in _SAFE_METHODS or has_body or basic:
            raise ProtocolError(
                f"{where}: not followed, pfsync never re-sends a request carrying a body or credentials",
                hint="configure the final URL itself (the redirect's target without its query)",
            )
        pinned = request.extensions.get(PIN_ORIGIN)
        if isinstance(pinned, str) and origin(target) != origin(pinned):
            raise ProtocolError(f"{where}: not followed, it leaves {shown_url(pinned)}'s origin")
        self.check_url(target, f"{where}:")

    def _bound(self, response: httpx.Response) -> None:
        """An answer read whole (not STREAMED by its caller): decoded in bounded pieces here, and
        refused past max_response_bytes, so a hostile body or gzip bomb cannot fill memory."""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if (
            self.max_response_bytes is None
            or response.request.extensions.get(STREAMED)
            or encoding not in _DECODABLE
        ):
            return
        where = f"{response.request.method} {shown_url(str(response.request.url))}"
        if not isinstance(response.stream, httpx.SyncByteStream):
            return  # an async stream: not ours
        response.stream = _BoundedBody(response.stream, encoding, self.max_response_bytes, where)
        if encoding not in ("", "identity"):
            del response.headers["Content-Encoding"]  # decoded above: httpx must not decode again


def _ssl_context(settings: HttpSettings) -> Any:
    """The CA trust: pfsync's own setting, else the environment's when trusted, else certifi."""
    try:
        if settings.ca_bundle:
            # An SSLContext rather than a path: httpx deprecates verify=<str>. Verification stays on.
            return ssl.create_default_context(cafile=str(settings.ca_bundle))
        if settings.trust_env and (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
            return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None,
                                              capath=os.environ.get("SSL_CERT_DIR") or None)  # fmt: skip
    except (OSError, ssl.SSLError) as exc:
        name = "http.ca_bundle" if settings.ca_bundle else "http.trust_env (SSL_CERT_FILE / SSL_CERT_DIR)"
        raise ConfigError(f"{name}: the CA certificates cannot be loaded: {exc.__class__.__name__}: {exc}",
                          setting="http.ca_bundle" if settings.ca_bundle else "http.trust_env") from None  # fmt: skip
    return True


def make_client(settings: HttpSettings, *, timeout: float | None = None, **kwargs: Any) -> httpx.Client:
    """The one place a real httpx.Client is built: TLS verification always on (CA from pfsync's
    settings), our User-Agent, proxy from pfsync's settings (the environment only with
    http.trust_env), and RequestGuard on every hop. Redirects of GETs are followed (signed
    storage), within RequestGuard's rules, at most MAX_REDIRECTS deep."""
    t = timeout if timeout is not None else settings.timeout
    if settings.proxy:  # a proxy URL may carry credentials: never shown
        register(urlsplit(settings.proxy).password)
    guard = RequestGuard(settings.allow_insecure_http, parse_networks(settings.allow_networks),
                         settings.max_response_bytes)  # fmt: skip
    return httpx.Client(
        verify=_ssl_context(settings),
        timeout=httpx.Timeout(t, connect=min(t, 30.0)),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=settings.trust_env,
        proxy=settings.proxy,
        event_hooks={"request": [guard.on_request], "response": [guard.on_response]},
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        **kwargs,
    )


def protocol_error(exc: httpx.HTTPError) -> PfsyncError:
    """A clear, documented error for an httpx failure that escaped the code that handles it:
    network failures are temporary (75), a redirect loop or an undecodable body is a refused
    answer (5). The URL is shown without its query; the exception text is redacted."""
    try:
        url = shown_url(str(exc.request.url))
        method = exc.request.method
    except RuntimeError:  # no request attached
        url, method = "(unknown URL)", "?"
    if isinstance(exc, httpx.TooManyRedirects):
        return ProtocolError(f"{method} {url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")
    if isinstance(exc, httpx.DecodingError):
        return ProtocolError(f"{method} {url}: the answer could not be decoded (its Content-Encoding does not "
                             "match its body)")  # fmt: skip
    if isinstance(exc, httpx.TransportError):
        return HTTPError(f"{method} {url} failed: {exc.__class__.__name__}", method=method, url=url)
    return ProtocolError(f"{method} {url}: {exc.__class__.__name__}: {server_text(str(exc))}")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    Some servers send epoch values (the SMART reference server sends epoch ms, then epoch s:
    docs/bulk-data.md "Retries and Retry-After"); a huge number that looks like an epoch is read as one.
    An absolute time that has already passed (clock skew, or an answer that took its time) asks for
    nothing: None, so that the caller's own backoff applies rather than an immediate retry.
    """
    if not value:
        return None
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
    else:
        if number <= 1e9:
            return max(0.0, number)
        when = number / 1000.0 if number > 1e12 else number  # epoch milliseconds, else epoch seconds
    return when - now if when > now else None


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SERVER_TEXT_MAX = 500


def server_text(text: str) -> str:
    """Text a server sent, made fit for a message: secrets masked, control characters (terminal
    escapes) dropped, at most SERVER_TEXT_MAX characters."""
    text = _CONTROL.sub("", text).strip()
    if len(text) > SERVER_TEXT_MAX:
        text = text[:SERVER_TEXT_MAX] + "..."
    return redact(text)


def outcome_text(response: httpx.Response) -> str | None:
    """The human text of an OperationOutcome body (details.text, diagnostics), or of an OAuth error."""
    try:
        content = response.content
    except httpx.HTTPError:  # unreadable or undecodable body: nothing to show
        return None
    try:
        body = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        text = content[:2000].decode("utf-8", "replace").strip()
        return server_text(text) if text else None
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
        return server_text("; ".join(parts)) if parts else None
    if "error" in body:  # OAuth2 error response (RFC 6749 5.2)
        desc = body.get("error_description")
        return server_text(f"{body['error']}: {desc}" if desc else str(body["error"]))
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


# The one statement of which answers are temporary in general (docs/bulk-data.md "Download" and
# "Kick-off": 408, 429, 5xx and network errors; docs/medplum.md "Quotas and 429"). A part of the spec
# that needs another rule uses its own table of RetryRules (BULK_RULES, STATUS_POLL_RULES).
TEMPORARY_RULES: tuple[RetryRule, ...] = (RetryRule(TEMPORARY_STATUS, "retry"),)
RETRYABLE_STATUS = frozenset().union(
    *(r.statuses for r in TEMPORARY_RULES if r.code is None and not r.not_fhir and r.verdict == "retry")
)
# One entry of a Medplum batch-response (docs/medplum.md "Batch Bundles"; the outer answer is 200
# whatever its entries say). Temporary as above, plus: 409, a serialization conflict between
# concurrent Bundles (docs/medplum.md "Measured on a real server"); 0, an entry the response lacks;
# a 400 "did not match resolved ID" (docs/medplum.md, recorded case 16: another writer created the
# identity first, so re-sending updates it). A 429 entry was not run (docs/medplum.md "Quotas and 429").
BATCH_ENTRY_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({0, 409}), "retry"),
    *TEMPORARY_RULES,
    RetryRule(frozenset({400}), "retry", text="did not match resolved ID"),
)


def is_temporary(response: httpx.Response, rules: tuple[RetryRule, ...] = TEMPORARY_RULES) -> bool:
    """Whether an answer is worth a retry within the retry budget: the first matching rule decides."""
    return classify(response, rules) == "retry"


def ratelimit_reset(response: httpx.Response) -> float | None:
    """Seconds until a spent request window resets, from Medplum's `RateLimit: "requests";r=0;t=N`
    (docs/medplum.md "Quotas and 429": a 429 carries no Retry-After). Only for a 429: a project with
    its quota off counts down to r=0 without refusing anything."""
    if response.status_code != 429:
        return None
    parts = parse_ratelimit(response.headers.get("RateLimit"))
    spent = [t for remaining, t in parts.values() if remaining <= 0]
    return max(spent) if spent else None


def wait_from_outcome(outcome: Any) -> float | None:
    """Seconds from a throttled OperationOutcome's diagnostics JSON (no Retry-After: docs/medplum.md)."""
    if not isinstance(outcome, dict):
        return None
    for issue in outcome.get("issue") or []:
        diag = issue.get("diagnostics") if isinstance(issue, dict) else None
        if not isinstance(diag, str) or not diag.startswith("{"):
            continue
        try:
            data = orjson.loads(diag)
        except orjson.JSONDecodeError:
            continue
        ms = data.get("msBeforeNext", data.get("_msBeforeNext")) if isinstance(data, dict) else None
        if isinstance(ms, int | float):
            return max(0.0, float(ms) / 1000.0)
    return None


def hinted_wait(response: httpx.Response, now: float) -> float | None:
    """What the server asks us to wait: Retry-After (either form), else on a 429 Medplum's
    throttled OperationOutcome (`msBeforeNext`) or its spent RateLimit window."""
    hinted = parse_retry_after(response.headers.get("Retry-After"), now)
    if hinted is not None or response.status_code != 429:
        return hinted
    try:
        body = orjson.loads(response.content) if response.content else None
    except (orjson.JSONDecodeError, httpx.HTTPError):
        body = None
    throttled = wait_from_outcome(body)
    return throttled if throttled is not None else ratelimit_reset(response)


# Set while the process is asked to stop (pfsync.sync.schedule.stop_on_signals: SIGTERM, SIGINT), so
# every retry wait ends early even where no stop event was handed down (token requests, reads).
RUN_STOP = threading.Event()


def wait(clock: Clock, seconds: float, stop: threading.Event | None, what: str = "the run") -> None:
    """Sleep `seconds` unless the run is asked to stop (`stop`, or RUN_STOP): then
    InterruptedRunError. Without `stop`: one sleep (on the real clock one that wakes on RUN_STOP);
    with it: slices of at most 0.5 s, checking it between them."""

    def stopped() -> bool:
        return (stop is not None and stop.is_set()) or RUN_STOP.is_set()

    def interrupted() -> InterruptedRunError:
        return InterruptedRunError(f"{what} interrupted while waiting to retry; the next run resumes")

    if stopped():
        raise interrupted()
    if stop is None:
        if type(clock) is SystemClock:
            RUN_STOP.wait(seconds)
        elif seconds > 0:
            clock.sleep(seconds)
        if stopped():
            raise interrupted()
        return
    deadline = clock.now() + seconds
    while (left := deadline - clock.now()) > 0:
        clock.sleep(min(left, 0.5))
        if stopped():
            raise interrupted()


@dataclass
class Retrier:
    """The retry decisions of one logical request: which answers are temporary (`rules`, the one
    classifier), how many failed attempts the budget allows (policy.retries), and how long to wait
    before the next (what the server asks: Retry-After in both forms, Medplum's msBeforeNext or
    spent RateLimit window, capped at policy.max_wait; else backoff). `throttle_patience`: seconds
    of 429 waits that do not use up attempts (Medplum's quota windows are waited out, not failed:
    docs/medplum.md "Quotas and 429"). Every loop that retries an HTTP call decides through one."""

    method: str
    url: str
    policy: RetryPolicy
    clock: Clock
    rules: tuple[RetryRule, ...] = TEMPORARY_RULES
    stop: threading.Event | None = None
    throttle_patience: float = 0.0
    attempt: int = 0
    throttled_for: float = 0.0

    def temporary(self, response: httpx.Response) -> bool:
        return classify(response, self.rules) == "retry"

    def next_wait(self, response: httpx.Response | None) -> float | None:
        """Count one failed attempt (a network error when `response` is None): the seconds to wait
        before the next, or None when the retry budget is spent."""
        hinted = hinted_wait(response, self.clock.now()) if response is not None else None
        if response is not None and response.status_code == 429:
            delay = (
                min(self.policy.max_wait, hinted)
                if hinted is not None
                else self.policy.backoff(self.attempt + 1)
            )
            if self.throttle_patience > 0 and self.throttled_for + delay <= self.throttle_patience:
                self.throttled_for += delay
                return delay
        self.attempt += 1
        if self.attempt > self.policy.retries:
            return None
        return min(self.policy.max_wait, hinted) if hinted is not None else self.policy.backoff(self.attempt)

    def pause(self, seconds: float, what: str = "the run") -> None:
        wait(self.clock, seconds, self.stop, what)

    def exhausted(self, response: httpx.Response | None, exc: Exception | None = None) -> HTTPError:
        """The error once the budget is spent (temporary: exit 75, the next run tries again)."""
        shown = shown_url(self.url)
        if response is None:
            reason = f"{exc.__class__.__name__}: {server_text(str(exc))}" if exc is not None else "no answer"
            return HTTPError(f"{self.method} {shown} failed after {self.policy.retries} retries: {reason}",
                             method=self.method, url=self.url)  # fmt: skip
        text = outcome_text(response)
        return HTTPError(
            f"{self.method} {shown} answered {response.status_code} after {self.policy.retries} retries"
            + (f": {text}" if text else ""),
            method=self.method,
            url=self.url,
            status=response.status_code,
            outcome=text,
        )


def request_with_retry(
    send: Callable[[], httpx.Response],
    *,
    method: str,
    url: str,
    policy: RetryPolicy,
    clock: Clock,
    rules: tuple[RetryRule, ...] = TEMPORARY_RULES,
    stop: threading.Event | None = None,
    on_retry: Callable[[int, float, str], None] | None = None,
    retry_if: Callable[[httpx.Response], bool] | None = None,
    throttle_patience: float = 0.0,
) -> httpx.Response:
    """Call `send` until it answers with a non-temporary status, retrying temporary failures.

    Temporary: network errors, and the answers `rules` classifies as "retry" (or `retry_if`
    accepts); the budget and the waits are Retrier's. `stop` cuts a wait short
    (InterruptedRunError). Redirect loops and undecodable bodies are ProtocolError. Returns the
    final response (which may be an error status the caller interprets); raises HTTPError
    (temporary) when retries are exhausted on a network error or temporary answer.
    """
    retrier = Retrier(method, url, policy, clock, rules, stop, throttle_patience)
    while True:
        try:
            response = send()
        except (httpx.TooManyRedirects, httpx.DecodingError) as exc:
            raise protocol_error(exc) from None
        except httpx.TransportError as exc:
            delay = retrier.next_wait(None)
            if delay is None:
                raise retrier.exhausted(None, exc) from None
            _retrying(method, url, retrier.attempt, policy.retries, delay, exc.__class__.__name__, on_retry)
            retrier.pause(delay)
            continue
        if not (retry_if(response) if retry_if is not None else retrier.temporary(response)):
            return response
        delay = retrier.next_wait(response)
        if delay is None:
            raise retrier.exhausted(response)
        _retrying(
            method, url, retrier.attempt, policy.retries, delay, f"HTTP {response.status_code}", on_retry
        )
        response.close()
        retrier.pause(delay)


def _retrying(
    method: str,
    url: str,
    attempt: int,
    retries: int,
    delay: float,
    reason: str,
    on_retry: Callable[[int, float, str], None] | None,
) -> None:
    """The event of a retry: a warning (a wait is never silent: an unreachable host would look like a
    hang; the url without its query) and the caller's callback."""
    log.warning("http_retry %s %s: %s; retry %d of %d in %.1f s", method, shown_url(url), reason, attempt,
                retries, delay, extra={"event": "http_retry"})  # fmt: skip
    if on_retry:
        on_retry(attempt, delay, reason)


def http_error(response: httpx.Response, what: str) -> HTTPError:
    """An HTTPError for an error response, carrying its OperationOutcome text (redacted URL)."""
    text = outcome_text(response)
    req = response.request
    return HTTPError(
        f"{what}: {req.method} {shown_url(str(req.url))} answered {response.status_code}"
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


# Largest piece one decompression step may produce: a gzip bomb (1000:1) is inflated in pieces of
# this size, never whole, so memory stays bounded whatever the ratio.
DECODE_CHUNK = 256 * 1024
ACCEPT_ENCODING = "gzip, deflate"


def iter_decoded(response: httpx.Response) -> Iterator[bytes]:
    """The body of a streamed response, its Content-Encoding (identity, gzip, deflate) undone in
    pieces of at most DECODE_CHUNK bytes (httpx's own decoder inflates a whole network read at
    once). Send `Accept-Encoding: ACCEPT_ENCODING` and the STREAMED extension with the request.
    ProtocolError for another encoding or a body that does not decode."""
    if response.is_stream_consumed:  # already read (httpx.MockTransport's answers are): decoded
        yield response.content
        return
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    where = f"{response.request.method} {shown_url(str(response.request.url))}"
    if encoding not in _DECODABLE:
        raise ProtocolError(f"{where}: unsupported Content-Encoding {server_text(encoding)!r}")
    yield from _decode(response.iter_raw(), encoding, where)


_DECODABLE = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


def _decode(raws: Iterable[bytes], encoding: str, where: str) -> Iterator[bytes]:
    """Undo `encoding` over raw pieces, yielding at most DECODE_CHUNK bytes at a time."""
    if encoding in ("", "identity"):
        yield from raws
        return
    decoder: Any = None
    for raw in raws:
        if decoder is None:
            if encoding == "deflate":  # RFC 9110 says zlib framing; some servers send raw deflate
                decoder = zlib.decompressobj(zlib.MAX_WBITS if raw[:1] == b"\x78" else -zlib.MAX_WBITS)
            else:
                decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        data = raw
        while data:
            try:
                out = decoder.decompress(data, DECODE_CHUNK)
            except zlib.error:
                raise ProtocolError(
                    f"{where}: the body is not valid {encoding} although its Content-Encoding says so"
                ) from None
            if out:
                yield out
            data = decoder.unconsumed_tail
            if decoder.eof:
                break
    if decoder is not None and not decoder.eof:
        # A body cut short: the caller sees fewer bytes (and decides, as for a dropped connection).
        tail = decoder.flush()
        if tail:
            yield tail


class _BoundedBody(httpx.SyncByteStream):
    """A response body decoded in bounded pieces and refused past `limit` decoded bytes."""

    def __init__(self, raw: httpx.SyncByteStream, encoding: str, limit: int, where: str) -> None:
        self._raw, self._encoding, self._limit, self._where = raw, encoding, limit, where

    def __iter__(self) -> Iterator[bytes]:
        total = 0
        for piece in _decode(self._raw, self._encoding, self._where):
            total += len(piece)
            if total > self._limit:
                raise ProtocolError(f"{self._where}: the answer is larger than {self._limit} bytes "
                                    "(http.max_response_bytes)")  # fmt: skip
            yield piece

    def close(self) -> None:
        # httpx's own stream refers back to its response (Response -> this -> BoundSyncStream ->
        # Response): left in place, every answer read whole was cyclic garbage, freed only by the
        # cyclic collector, which a load runs seldom (pfsync.core.tuning). Bundle answers and their
        # requests' bodies (~0.1 MB each) piled up by the hundred: the RSS of a first sync grew with
        # the practice. Dropping the reference once the body is read frees them at once.
        raw, self._raw = self._raw, _CLOSED
        raw.close()


_CLOSED = httpx.ByteStream(b"")


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The body of a 2xx answer that must be a JSON object (a Bundle, a resource, a manifest);
    ProtocolError (exit 5) naming `what` and the URL (without its query) when it is not."""
    try:
        body = orjson.loads(response.content)
    except (orjson.JSONDecodeError, httpx.HTTPError):
        body = None
    if not isinstance(body, dict):
        kind = "a JSON " + type(body).__name__.replace("list", "array") if body is not None else "not JSON"
        raise ProtocolError(f"{what}: {response.request.method} {shown_url(str(response.request.url))} answered "
                            f"{response.status_code} with a body that is {kind}, not a JSON object")  # fmt: skip
    return body


def next_link(bundle: dict[str, Any], current: str, what: str, *, rebase_on: str | None = None) -> str | None:
    """The one reading of a Bundle's `next` link, resolved against `current`. A server may page,
    not send pfsync (and what it reads next, taken as data) elsewhere: the link must stay on the
    origin of `current`, or, with `rebase_on` (a FHIR base URL), is moved onto it when it names
    the same FHIR path under another base (Medplum writes links with its configured public base,
    which may differ from the URL pfsync reaches it by); anything else is ProtocolError."""
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            url = str(httpx.URL(current).join(link["url"]))
            if rebase_on is not None and not url.startswith(rebase_on):
                marker = urlsplit(rebase_on).path
                parts = urlsplit(url)
                tail = parts.path + ("?" + parts.query if parts.query else "")
                at = tail.find(marker)
                if at >= 0:
                    url = rebase_on + tail[at + len(marker) :]
            home = rebase_on if rebase_on is not None else current
            if origin(url) != origin(home):
                raise ProtocolError(f"{what}: the next page {shown_url(url)} is not on {origin(home)}")
            return url
    return None
