"""The retry loop every HTTP call goes through: RetryPolicy (the budget and backoff), `Retrier` (the
decisions of one logical request: temporary or not by the classifier, the next wait, the error once
the budget is spent) and `request_with_retry`, with its `http_retry` warning.

May import: pfsync.core, pfsync.net.classify, pfsync.net.waits, pfsync.net.responses, pfsync.net.client.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from pfsync.core.errors import HTTPError
from pfsync.core.netpolicy import shown_url
from pfsync.core.settings import HttpSettings
from pfsync.net.classify import TEMPORARY_RULES, RetryRule, classify
from pfsync.net.client import protocol_error
from pfsync.net.responses import outcome_text, server_text
from pfsync.net.waits import Clock, hinted_wait, wait

log = logging.getLogger("pfsync.http")


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
