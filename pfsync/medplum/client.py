"""The one Medplum client: auth, quota pacing, 429 waits and paging for every call pfsync sends to Medplum.

Every Medplum caller (the loader's lookups and Bundles, attachment uploads, verify's reads, the
Medplum state store) talks to Medplum through a MedplumClient, which sends over pfsync.net.http's one
request path (RequestGuard on every hop, the Retrier's classifier and waits) and adds what is
Medplum's own:
- auth: the process's shared token (pfsync.medplum.auth), renewed once on a 401 (BearerAuth);
- quota pacing: every answer's `RateLimit` feeds one pacing.Pacer, and a search waits while the
  enforced budget is spent (docs/medplum.md "Quotas and 429");
- 429 waits: Medplum's 429 has no Retry-After; the wait is `msBeforeNext` or the spent RateLimit
  window (pfsync.net.http.hinted_wait), waited out for up to `throttle_patience` seconds before the
  retry budget counts it, since a spent quota window is a wait, not a failure;
- paging: searchset `next` links followed on the configured FHIR base only
  (docs/medplum.md "Searching": Medplum writes them with its public base URL).

Thread-safety: `send_once`, `fetch` and `send(cost=None)` touch nothing but the HTTP client and
may run on worker threads (Bundles, attachment uploads); the client's own Pacer calls hold its
lock, and the Bundle sender (pfsync.medplum.upsert) reads that Pacer on the loader's thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from pfsync.core.settings import HttpSettings, MedplumSettings
from pfsync.medplum.auth import medplum_auth
from pfsync.net.http import (
    TEMPORARY_RULES,
    Clock,
    Retrier,
    RetryPolicy,
    RetryRule,
    SystemClock,
    json_object,
    next_link,
    protocol_error,
    raise_for_status,
    wait,
)
from pfsync.net.pacing import SEARCH_COST, Pacer

Json = dict[str, Any]
Cost = Literal["search", "read", "history", "write"]
# docs/medplum.md "Quota costs": points per interaction, counted when no RateLimit delta measures them.
COSTS: dict[Cost, int] = {"search": int(SEARCH_COST), "read": 1, "history": 10, "write": 100}
FHIR_JSON = "application/fhir+json"
# A POST that creates (a Binary upload) may have run when its answer was lost or a 5xx: only a 429,
# which Medplum never runs (docs/medplum.md "Quotas and 429"), is re-sent by the client itself.
THROTTLED_ONLY: tuple[RetryRule, ...] = (RetryRule(frozenset({429}), "retry"),)
THROTTLE_PATIENCE = 3600.0  # seconds of 429 waits before they count against http.retries
ResponseHook = Callable[[str | None, int, int, bool], None]  # RateLimit, writes, searches, throttled
# A request body: bytes, or pieces (a spooled Binary upload) that come with their Content-Length
# header (httpx would otherwise send them chunked) and start again from the first byte each time
# they are iterated (a 429 or a 401 sends the request again; httpx refuses a consumed generator).
Body = bytes | Iterable[bytes]


@dataclass
class MedplumStats:
    """What a client spent on Medplum: requests sent, searches, 429s, seconds waited (pacing and 429s)."""

    requests: int = 0
    searches: int = 0
    throttled: int = 0
    waited: float = 0.0


class MedplumClient:
    """Requests to one Medplum FHIR base over an httpx.Client built by pfsync.net.http.make_client.

    `auth`: the Medplum httpx.Auth (`connect` builds the process's shared one); None keeps the
    httpx client's own. `estimate_unmeasured`: an answer whose RateLimit shows no delta counts
    the cost table's points (verify reports the quota it used)."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        fhir_url: str | None = None,
        auth: httpx.Auth | None = None,
        pacer: Pacer | None = None,
        clock: Clock | None = None,
        policy: RetryPolicy | None = None,
        stop: threading.Event | None = None,
        throttle_patience: float = THROTTLE_PATIENCE,
        estimate_unmeasured: bool = False,
    ) -> None:
        base = fhir_url if fhir_url is not None else str(http.base_url)
        self.http = http
        self.fhir_url = base if not base or base.endswith("/") else base + "/"
        self.auth = auth
        self.pacer = pacer if pacer is not None else Pacer()
        self.clock = clock if clock is not None else SystemClock()
        self.policy = policy if policy is not None else RetryPolicy()
        self.stop = stop
        self.throttle_patience = throttle_patience
        self.estimate_unmeasured = estimate_unmeasured
        self.stats = MedplumStats()
        self.on_response: ResponseHook | None = None
        self._lock = threading.Lock()  # the Pacer and stats, for a client shared across threads

    @classmethod
    def connect(
        cls, medplum: MedplumSettings, http: httpx.Client, *, settings: HttpSettings | None = None,
        clock: Clock | None = None, stop: threading.Event | None = None,
    ) -> MedplumClient:  # fmt: skip
        """A client with the configured Medplum auth: the process's shared token (or Basic). `http`
        carries no auth of its own (ValueError otherwise): the token lives here, so there is one
        place that adds it and one token per process. The client owns `http` from now on: `close`
        closes it, and a failure here (a missing secret) closes it too."""
        settings = settings or HttpSettings()
        try:
            if http.auth is not None:
                raise ValueError(
                    "MedplumClient.connect: the httpx.Client must carry no auth, the MedplumClient owns it"
                )
            auth = medplum_auth(medplum, clock=clock, http=settings)
        except BaseException:
            http.close()
            raise
        return cls(http, fhir_url=medplum.fhir_url, auth=auth, clock=clock, policy=RetryPolicy.from_settings(settings),
                   stop=stop)  # fmt: skip

    def sibling(self, *, pacer: Pacer | None = None, throttle_patience: float | None = None,
                estimate_unmeasured: bool | None = None) -> MedplumClient:  # fmt: skip
        """A client over the same connection, auth, clock, retry policy and stop, with its own
        stats and the Pacer given (a new one by default): for a caller that reports its own quota
        (verify) or waits longer on 429s. Closing either closes the shared connection."""
        return MedplumClient(
            self.http, fhir_url=self.fhir_url, auth=self.auth, pacer=pacer, clock=self.clock, policy=self.policy,
            stop=self.stop,
            throttle_patience=self.throttle_patience if throttle_patience is None else throttle_patience,
            estimate_unmeasured=self.estimate_unmeasured if estimate_unmeasured is None else estimate_unmeasured,
        )  # fmt: skip

    def close(self) -> None:
        """Close the HTTP client (idempotent)."""
        self.http.close()

    def __enter__(self) -> MedplumClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def server_key(self) -> str:
        """The FHIR base as httpx normalizes it (host lower-case, default port dropped): what an id
        map records as its Medplum server, the same string an httpx.Client's base_url gave before
        the loader took a MedplumClient, so existing maps stay valid."""
        return str(httpx.URL(self.fhir_url))

    def url(self, path: str) -> str:
        """`path` (relative to the FHIR base, or absolute) as an absolute URL."""
        if "://" in path or not self.fhir_url:
            return path
        return str(httpx.URL(self.fhir_url).join(path))

    # ---------------------------------------------------------------- one attempt (any thread)
    def send_once(self, method: str, path: str, *, params: dict[str, str] | None = None,
                  content: Body | None = None, headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
        """One attempt, no retry and no bookkeeping, with exactly the `headers` given: for requests
        whose retry is a decision of the caller (a batch Bundle's entries, pfsync.medplum.upsert), and for
        worker threads. Network errors propagate as httpx.TransportError; a redirect loop or an
        undecodable body is ProtocolError."""
        request = self.http.build_request(
            method, self.url(path), params=params, content=content, headers=headers
        )
        try:
            if self.auth is None:
                return self.http.send(request)  # the httpx client's own auth
            return self.http.send(request, auth=self.auth)
        except (httpx.TooManyRedirects, httpx.DecodingError) as exc:
            raise protocol_error(exc) from None

    def fetch(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        """The first attempt of a GET, on any thread: hand it to `send(..., first=)` on the caller's."""
        return self.send_once("GET", path, params=params, headers={"Accept": FHIR_JSON})

    # ---------------------------------------------------------------- the paced, retried path
    def send(
        self,
        method: str,
        path: str,
        *,
        cost: Cost | None = "read",
        params: dict[str, str] | None = None,
        content: Body | None = None,
        headers: dict[str, str] | None = None,
        rules: tuple[RetryRule, ...] = TEMPORARY_RULES,
        first: Callable[[], httpx.Response] | None = None,
        resend_after_network_error: bool = True,
    ) -> httpx.Response:
        """One request, paced by the quota, with the temporary answers of `rules` retried (429s
        waited out first); returns the final answer, which the caller interprets. `first`: the
        first attempt's answer, already sent by `fetch` on a worker thread. `cost` None: neither
        paced nor counted (Pacer and stats are the caller's thread's), so safe on a worker thread.
        `resend_after_network_error` False: a lost answer propagates (httpx.TransportError) for a
        request that may have run (a create)."""
        url = self.url(path)
        headers = {"Accept": FHIR_JSON, **(headers or {})}
        retrier = Retrier(method, url, self.policy, self.clock, rules, self.stop, self.throttle_patience)
        while True:
            try:
                if first is not None:
                    prefetched, first = first, None
                    response = prefetched()
                else:
                    self._pace(cost)
                    response = self.send_once(method, url, params=params, content=content, headers=headers)
            except httpx.TransportError as exc:
                if not resend_after_network_error:
                    raise
                delay = retrier.next_wait(None)
                if delay is None:
                    raise retrier.exhausted(None, exc) from None
                self._wait(delay, counted=cost is not None)
                continue
            throttled = response.status_code == 429
            self._observe(response, cost, throttled)
            if not retrier.temporary(response):
                return response
            delay = retrier.next_wait(response)
            if delay is None:
                raise retrier.exhausted(response)
            response.close()
            if throttled and cost is not None:
                with self._lock:
                    self.stats.throttled += 1
                    self.pacer.throttle(delay, self.clock.now())  # every search of this client waits too
            self._wait(delay, counted=cost is not None)

    def _pace(self, cost: Cost | None) -> None:
        if cost is not None and cost != "read":
            with self._lock:
                pause = self.pacer.search_wait(self.clock.now())
            if pause > 0:
                self._wait(pause)

    def _wait(self, seconds: float, *, counted: bool = True) -> None:
        if counted:
            with self._lock:
                self.stats.waited += seconds
        wait(self.clock, seconds, self.stop, "the Medplum request")

    def _observe(self, response: httpx.Response, cost: Cost | None, throttled: bool) -> None:
        """Feed the Pacer from an answer's RateLimit (docs/medplum.md "Quotas and 429")."""
        if cost is None:
            return
        header = response.headers.get("RateLimit")
        writes, searches = (1 if cost == "write" else 0), (1 if cost == "search" else 0)
        with self._lock:
            self.stats.requests += 1
            self.stats.searches += searches
            before = self.pacer.used
            self.pacer.observe(
                header, entries=writes, searches=searches, now=self.clock.now(), throttled=throttled
            )
            if self.estimate_unmeasured and self.pacer.used == before:
                # Every interaction costs at least a point: no delta means it could not be measured (no
                # header, or a quota-off project whose counter sits at r=0: docs/medplum.md "Quotas and 429").
                self.pacer.used += COSTS[cost]
        if self.on_response is not None:
            self.on_response(header, writes, searches, throttled)

    def observe_bundle(self, ratelimit: str | None, entries: int, throttled: bool) -> None:
        """Feed the Pacer from a batch Bundle's answer (sent with `send_once` on a worker thread)."""
        self.pacer.observe(ratelimit, entries=entries, searches=0, now=self.clock.now(), throttled=throttled)
        if self.on_response is not None:
            self.on_response(ratelimit, entries, 0, throttled)

    # ---------------------------------------------------------------- reads and searches
    def get_json(self, path: str, what: str, *, params: dict[str, str] | None = None, cost: Cost = "search",
                 first: Callable[[], httpx.Response] | None = None) -> Json:  # fmt: skip
        """A 2xx answer that must be a JSON object (HTTPError for an error status, ProtocolError,
        exit 5, for anything else: taking a proxy's page as "no match" would create duplicates)."""
        response = self.send("GET", path, cost=cost, params=params, first=first)
        raise_for_status(response, what)
        return json_object(response, what)

    def pages(self, path: str, what: str, *, params: dict[str, str] | None = None,
              cost: Cost = "search") -> Iterator[list[Json]]:  # fmt: skip
        """The resources of a searchset, one page at a time, following `next` links on the
        configured FHIR base only (pfsync.net.http.next_link). Stops at a page without entries."""
        url: str | None = self.url(path)
        while url is not None:
            bundle = self.get_json(url, what, params=params, cost=cost)
            entries = bundle.get("entry")
            resources = [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)] \
                if isinstance(entries, list) else []  # fmt: skip
            if not resources:
                return
            url = next_link(bundle, url, what, rebase_on=self.fhir_url or None)
            params = None  # a next link carries the query
            del bundle  # one page in memory at a time
            yield resources

    def search_all(
        self, path: str, params: dict[str, str] | None, what: str = "a Medplum search"
    ) -> list[Json]:
        """Every resource of a search (every page)."""
        return [resource for page in self.pages(path, what, params=params) for resource in page]
