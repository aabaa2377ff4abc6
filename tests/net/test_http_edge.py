"""Unit tests of the one request path (pfsync.net.http) and the URL rules (pfsync.core.netpolicy): the
classifier, waits, paging and decoding helpers in isolation. The same rules over real HTTP are in
tests/test_hostile_*.py."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator

import httpx
import pytest
from doubles import FakeClock

from pfsync.core.errors import InterruptedRunError, ProtocolError
from pfsync.core.netpolicy import parse_networks, shown_url, url_problem
from pfsync.medplum.asyncbatch import AsyncBatchRunner
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import (
    DECODE_CHUNK,
    RetryPolicy,
    RetryRule,
    hinted_wait,
    is_temporary,
    iter_decoded,
    next_link,
    parse_retry_after,
    request_with_retry,
)


def _response(status: int, body: bytes = b"", **headers: str) -> httpx.Response:
    return httpx.Response(
        status, headers=headers, content=body, request=httpx.Request("GET", "https://h.example/x")
    )


@pytest.mark.parametrize(
    ("url", "allowed", "refused"),
    [
        ("https://ehr.example/fhir", (), None),
        ("http://127.0.0.1:8080/x", (), None),
        ("http://localhost/x", (), None),
        ("http://ehr.example/x", (), "plain http"),
        ("https://169.254.169.254/latest", (), "special-purpose"),
        ("https://169.254.169.254/latest", ("169.254.0.0/16",), None),
        ("https://[::ffff:a9fe:a9fe]/x", (), "special-purpose"),
        ("https://[fd00:ec2::254]/x", (), "special-purpose"),
        ("https://10.1.2.3/fhir", (), None),  # private ranges stay allowed (self-hosted Medplum)
        ("https://0.0.0.0/x", (), "special-purpose"),
        ("ftp://ehr.example/x", (), "scheme"),
        ("https:///nohost", (), "no host"),
    ],
)
def test_url_rules(url: str, allowed: tuple[str, ...], refused: str | None) -> None:
    problem = url_problem(url, allow_networks=parse_networks(allowed))
    assert (problem is None) if refused is None else (problem is not None and refused in problem), problem


def test_shown_url_drops_user_info_query_and_fragment() -> None:
    assert shown_url("https://u:p@h.example:8443/a/b?sig=1#f") == "https://h.example:8443/a/b"


def test_classifier_is_data_and_a_kind_rule_is_one_entry() -> None:
    transient = b'{"resourceType":"OperationOutcome","issue":[{"code":"transient"}]}'
    fatal = b'{"resourceType":"OperationOutcome","issue":[{"code":"exception"}]}'
    general = (RetryRule(frozenset({500, 503}), "retry"),)
    # Export polling: the general table with one kind of 500 made final, as rows ahead of it.
    polling = (
        RetryRule(frozenset({500}), "retry", code="transient"),
        RetryRule(frozenset({500}), "retry", not_fhir=True),
        RetryRule(frozenset({500}), "final"),
        *general,
    )
    assert is_temporary(_response(503), rules=polling)
    assert is_temporary(_response(500, transient), polling)
    assert is_temporary(_response(500, b"<html>bad gateway</html>"), polling)
    assert not is_temporary(_response(500, fatal), polling)
    assert is_temporary(_response(500, fatal), general)
    assert is_temporary(_response(429)) and not is_temporary(_response(404))


def test_waits_come_from_retry_after_or_a_spent_ratelimit_window() -> None:
    assert hinted_wait(_response(503, b"", **{"Retry-After": "7"}), 0) == 7
    assert hinted_wait(_response(429, b"", **{"Retry-After": "Thu, 01 Jan 1970 00:00:30 GMT"}), 10) == 20
    assert hinted_wait(_response(429, RateLimit='"requests";r=0;t=42, "fhirInteractions";r=9;t=5'), 0) == 42
    throttled = b'{"resourceType":"OperationOutcome","issue":[{"code":"throttled","diagnostics":"{\\"msBeforeNext\\":2500}"}]}'
    assert hinted_wait(_response(429, throttled, RateLimit='"fhirInteractions";r=0;t=42'), 0) == 2.5
    # A quota-off project counts down to r=0 without refusing: not a reason to wait on a 200/503.
    assert hinted_wait(_response(503, RateLimit='"fhirInteractions";r=0;t=42'), 0) is None


def test_request_with_retry_waits_out_a_429_capped_and_stops_on_sigterm() -> None:
    clock = FakeClock(start=1_000.0)
    answers = iter([_response(429, RateLimit='"requests";r=0;t=500'), _response(200)])
    response = request_with_retry(lambda: next(answers), method="POST", url="https://h/t",
                                  policy=RetryPolicy(retries=3, max_wait=30), clock=clock)  # fmt: skip
    assert response.status_code == 200 and clock.slept == [30]
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedRunError):
        request_with_retry(lambda: _response(503), method="GET", url="https://h/t", policy=RetryPolicy(retries=3),
                           clock=FakeClock(start=1_000.0), stop=stop)  # fmt: skip


@pytest.mark.parametrize(
    "value", ["Thu, 01 Jan 1970 00:00:30 GMT", "1700000000", "1700000000000"]
)  # an HTTP date, epoch seconds and epoch milliseconds, each before "now"
def test_an_absolute_retry_after_in_the_past_gets_a_backoff_not_an_immediate_retry(value: str) -> None:
    """Issue 20: a Retry-After naming a time that has passed asked for a 0 s wait on the generic
    path (a retry at once, e.g. the SMART reference server's epoch time after a slow answer)."""
    now = 1_800_000_000.0
    assert parse_retry_after(value, now) is None  # asks for nothing: the caller's backoff applies
    assert parse_retry_after("0", now) == 0  # a delay of 0 is the server's explicit wish
    assert parse_retry_after("1800000005000", now) == 5  # still ahead: waited for
    clock = FakeClock(start=1_000.0)
    clock.t = now
    answers = iter(
        [
            httpx.Response(
                503, headers={"Retry-After": value}, request=httpx.Request("GET", "https://h.example/x")
            ),
            _response(200),
        ]
    )
    response = request_with_retry(lambda: next(answers), method="GET", url="https://h/t",
                                  policy=RetryPolicy(retries=3, base=0.5), clock=clock)  # fmt: skip
    assert response.status_code == 200 and len(clock.slept) == 1 and clock.slept[0] >= 0.375


def test_next_link_stays_on_its_origin_or_is_rebased() -> None:
    page = {"link": [{"relation": "next", "url": "https://public.example/fhir/R4/Patient?_offset=20"}]}
    assert next_link(
        page, "https://h.example/fhir/R4/Patient", "s", rebase_on="https://h.example/fhir/R4/"
    ) == ("https://h.example/fhir/R4/Patient?_offset=20")
    with pytest.raises(ProtocolError, match="is not on"):
        next_link(page, "https://h.example/fhir/R4/Patient", "s")
    foreign = {"link": [{"relation": "next", "url": "https://evil.example/elsewhere"}]}
    with pytest.raises(ProtocolError):
        next_link(foreign, "https://h.example/fhir/R4/x", "s", rebase_on="https://h.example/fhir/R4/")
    assert next_link({"link": "not a list"}, "https://h.example/x", "s") is None


def test_iter_decoded_inflates_in_bounded_pieces() -> None:
    body = gzip.compress(bytes(8 * DECODE_CHUNK))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(body))

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        client.stream("GET", "https://h/f") as r,
    ):
        pieces = list(iter_decoded(r))
    assert sum(map(len, pieces)) == 8 * DECODE_CHUNK
    assert max(map(len, pieces)) <= DECODE_CHUNK


def test_async_batch_status_on_another_origin_is_not_followed() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(202, headers={"Content-Location": "https://evil.example/job/1"})

    client = httpx.Client(transport=httpx.MockTransport(handler), base_url="https://medplum.example/fhir/R4/")
    clock = FakeClock(start=1_000.0)
    runner = AsyncBatchRunner(MedplumClient(client, clock=clock), clock, max_bytes=1 << 20)
    status, _, _, error = runner.run(b"{}")
    assert status == 502 and error is not None and "not on Medplum's origin" in error
    assert seen == ["https://medplum.example/fhir/R4/"]


def test_a_host_name_resolving_to_a_special_purpose_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from pfsync.core import netpolicy
    from pfsync.core.settings import HttpSettings
    from pfsync.net.http import make_client

    def fake(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        address = {"metadata.example": "169.254.169.254", "ehr.example": "93.184.216.34"}[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)  # the module netpolicy resolves through
    netpolicy._resolve.cache_clear()
    assert netpolicy.resolved_problem("https://ehr.example/fhir") is None
    assert "resolves to 169.254.169.254" in (netpolicy.resolved_problem("https://metadata.example/x") or "")
    allowed = netpolicy.parse_networks(["169.254.0.0/16"])
    assert netpolicy.resolved_problem("https://metadata.example/x", allow_networks=allowed) is None
    with make_client(HttpSettings()) as client, pytest.raises(ProtocolError, match="special-purpose"):
        client.get("https://metadata.example/latest/meta-data/")
    netpolicy._resolve.cache_clear()


@pytest.mark.parametrize(
    "body", [b"<html>a proxy's page</html>", b"[]", b'{"entry":[{"resource":{"resourceType":"Basic"}}]}']
)
def test_medplum_state_store_refuses_a_malformed_answer(body: bytes) -> None:
    from pfsync.sync.state_medplum import MedplumStateStore

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": "application/fhir+json"})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    medplum = MedplumClient(client, fhir_url="https://medplum.example/fhir/R4/", clock=FakeClock(start=1_000.0),
                            policy=RetryPolicy(retries=0))  # fmt: skip
    store = MedplumStateStore(medplum)
    with pytest.raises(ProtocolError):
        store.load("practice-a")


def test_a_retry_wait_on_the_real_clock_ends_when_the_process_is_asked_to_stop() -> None:
    from pfsync.net.http import RUN_STOP, SystemClock

    threading.Timer(0.2, RUN_STOP.set).start()
    try:
        with pytest.raises(InterruptedRunError):  # not HTTPError after one 5 s wait and one more 503
            request_with_retry(lambda: _response(503, b"", **{"Retry-After": "3600"}), method="GET", url="https://h/t",
                               policy=RetryPolicy(retries=1, max_wait=5), clock=SystemClock())  # fmt: skip
    finally:
        RUN_STOP.clear()


def test_an_answer_read_whole_is_freed_without_the_cyclic_collector() -> None:
    """Issue 19: httpx's stream refers back to its response; every Bundle answer (and its request's
    body) was cyclic garbage that piled up between the load's rare collections, so the RSS of a first
    sync grew with the practice."""
    import gc
    import weakref

    from pfsync.core.settings import HttpSettings
    from pfsync.net.http import make_client

    body = b'{"resourceType":"Bundle","type":"batch-response","entry":[]}' * 100

    class Streamed(httpx.SyncByteStream):  # as from a socket (a bytes body would be read at once)
        def __iter__(self) -> Iterator[bytes]:
            yield body

    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=Streamed()))
    with make_client(HttpSettings(), transport=transport) as client:
        gc.collect()
        gc.disable()
        try:
            response = client.post("http://127.0.0.1:9/fhir/R4/", content=b"{}" * 1000)
            assert response.content == body
            freed = weakref.ref(response)
            del response
            assert freed() is None  # freed by reference counting, not left for the collector
        finally:
            gc.enable()
