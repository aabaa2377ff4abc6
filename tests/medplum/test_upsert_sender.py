"""BatchSender and pacing with a fake server (httpx.MockTransport) and a fake clock: no sleeping."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from load_helpers import FakeClock

from pfsync.core.errors import HTTPError, InterruptedRunError
from pfsync.medplum.batch import Entry, EntryResult, Kind
from pfsync.medplum.bundlesend import Exhausted, Recheck, Released, Report, Settled, Superseded
from pfsync.medplum.client import MedplumClient
from pfsync.medplum.upsert import BatchSender
from pfsync.net.http import RetryPolicy
from pfsync.net.pacing import Concurrency, Pacer, parse_ratelimit


class Reports:
    """Takes the sender's reports after each call, as the router does (pfsync.load.routing), and
    sorts them by kind; a released create becomes an update by id when its identity is `known`."""

    def __init__(self) -> None:
        self.done: list[tuple[str, Kind, EntryResult]] = []
        self.exhausted_: list[str] = []
        self.rechecks: list[str] = []
        self.released: list[str] = []
        self.superseded_: list[str] = []
        self.known: set[str] = set()

    def take(self, sender: BatchSender) -> bool:
        """-> whether a released create went back to the sender."""
        requeued = False
        while reports := sender.take_reports():
            for report in reports:
                match report:
                    case Settled(entry, kind, result):
                        self.done.append((entry.sid, kind, result))
                    case Exhausted(entry, _):
                        self.exhausted_.append(entry.sid)
                    case Recheck(entry):
                        self.rechecks.append(entry.sid)
                    case Superseded(entry):
                        self.superseded_.append(entry.sid)
                    case Released(entry):
                        self.released.append(entry.sid)
                        if entry.sid in self.known:  # the other write created it: now an update by id
                            entry.retarget("PUT", f"Patient/m-{entry.sid}")
                            sender.requeue(entry)
                            requeued = True
        return requeued

    def flush(self, sender: BatchSender) -> None:
        """`sender.flush()` until no released create goes back to it."""
        sender.flush()
        while self.take(sender):
            sender.flush()


Answer = Callable[[list[dict[str, Any]], int], tuple[int, Any, dict[str, str]]]


def server(answer: Answer) -> tuple[httpx.Client, list[list[dict[str, Any]]]]:
    seen: list[list[dict[str, Any]]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        entries = orjson.loads(request.content)["entry"]
        seen.append(entries)
        status, body, headers = answer(entries, len(seen))
        return httpx.Response(status, content=orjson.dumps(body), headers=headers)

    return httpx.Client(transport=httpx.MockTransport(handle), base_url="http://medplum.test/fhir/R4/"), seen


def response(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": s} for s in statuses]}


def created(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"status": "201", "location": f"Patient/m-{e['request']['url'].rsplit('|', 1)[-1]}"} for e in entries
    ]


def throttled(ms: int) -> dict[str, Any]:
    diag = orjson.dumps({"_remainingPoints": 0, "_msBeforeNext": ms, "limit": 5000}).decode()
    oo = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "throttled",
          "details": {"text": "Too Many Requests"}, "diagnostics": diag}]}  # fmt: skip
    return {"status": "429", "outcome": oo}


def entry(i: int | str, body: bytes = b'{"resourceType":"Patient"}') -> Entry:
    return Entry("Patient", str(i), "PUT", f"Patient?identifier=s|{i}", body)


def make(client: httpx.Client, clock: FakeClock, **kw: Any) -> BatchSender:
    opts: dict[str, Any] = {
        "max_bytes": 900_000,
        "max_entries": 10,
        "max_concurrency": 1,
        "retry": RetryPolicy(retries=3),
    }
    opts.update(kw)
    medplum = MedplumClient(client, clock=clock, policy=opts["retry"], stop=opts.get("stop"))
    return BatchSender(medplum, clock=clock, **opts)


def test_sender_retries_only_throttled_entries_after_ms_before_next() -> None:
    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        if n == 1:
            return 200, response(created(entries[:3]) + [throttled(1500)] * (len(entries) - 3)), {}
        return 200, response(created(entries)), {}

    client, seen = server(answer)
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock)
    for i in range(5):
        sender.add(entry(i))
    reports.flush(sender)
    assert [len(b) for b in seen] == [5, 2]
    assert [e["request"]["url"] for e in seen[1]] == ["Patient?identifier=s|3", "Patient?identifier=s|4"]
    assert sum(clock.slept) >= 1.5
    assert sorted(sid for sid, kind, _ in reports.done if kind is Kind.CREATED) == ["0", "1", "2", "3", "4"]


def test_sender_retries_conflicts_and_shrinks_concurrency() -> None:
    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        statuses = created(entries)
        if n == 1:
            statuses[1] = {"status": "409", "outcome": {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "conflict", "details": {"text": "could not serialize access"}}]}}  # fmt: skip
        return 200, response(statuses), {}

    client, seen = server(answer)
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, max_concurrency=4)
    for i in range(3):
        sender.add(entry(i))
    reports.flush(sender)
    assert [len(b) for b in seen] == [3, 1]
    assert sender.stats.conflicts == 1
    assert len(reports.done) == 3


def test_sender_dedupes_identity_last_wins() -> None:
    client, seen = server(lambda entries, n: (200, response(created(entries)), {}))
    reports = Reports()
    sender = make(client, FakeClock())
    sender.add(entry(1, b'{"resourceType":"Patient","gender":"male"}'))
    sender.add(entry(2))
    sender.add(entry(1, b'{"resourceType":"Patient","gender":"female"}'))
    reports.flush(sender)
    assert len(seen) == 1 and len(seen[0]) == 2
    assert [e["resource"].get("gender") for e in seen[0] if e["request"]["url"].endswith("|1")] == ["female"]


def test_sender_splits_on_file_too_large() -> None:
    too_large = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                 "details": {"text": "File too large"}}]}  # fmt: skip

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        if len(entries) > 2:
            return 400, too_large, {}
        return 200, response(created(entries)), {}

    client, seen = server(answer)
    reports = Reports()
    sender = make(client, FakeClock())
    for i in range(8):
        sender.add(entry(i))
    reports.flush(sender)
    assert [len(b) for b in seen] == [8, 4, 4, 2, 2, 2, 2]  # halves until the server takes them
    assert len(reports.done) == 8 and all(kind is Kind.CREATED for _, kind, _ in reports.done)
    assert sender.stats.splits >= 2


def test_sender_cuts_bundles_by_bytes_and_count() -> None:
    client, seen = server(lambda entries, n: (200, response(created(entries)), {}))
    sender = make(client, FakeClock(), max_bytes=16 * 1024, max_entries=50)
    big = b'{"resourceType":"Patient","text":"' + b"x" * 3000 + b'"}'
    for i in range(20):
        sender.add(entry(i, big))
    sender.flush()
    assert sum(len(b) for b in seen) == 20
    assert all(len(orjson.dumps({"entry": b})) <= 16 * 1024 for b in seen)
    assert max(len(b) for b in seen) <= 5


def test_sender_outer_5xx_and_network_errors_are_retried_then_queued() -> None:
    calls = {"n": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("reset")
        return httpx.Response(503, json={"resourceType": "OperationOutcome", "issue": []})

    client = httpx.Client(transport=httpx.MockTransport(handle), base_url="http://medplum.test/fhir/R4/")
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, retry=RetryPolicy(retries=2))
    sender.add(entry(1))
    reports.flush(sender)
    assert reports.exhausted_ == ["1"]
    assert calls["n"] == 3 and clock.slept


def test_sender_post_with_lost_response_is_rechecked_not_resent() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("lost")

    client = httpx.Client(transport=httpx.MockTransport(handle), base_url="http://medplum.test/fhir/R4/")
    reports = Reports()
    sender = make(client, FakeClock())
    sender.add(Entry("Patient", "1", "POST", "Patient", b"{}"))
    reports.flush(sender)
    assert reports.rechecks == ["1"]


def test_pacer_spends_budget_then_waits_for_reset() -> None:
    pacer, now = Pacer(), 100.0
    pacer.observe(
        '"requests";r=59990;t=60, "fhirInteractions";r=1000;t=6',
        entries=0,
        searches=1,
        now=now,
        throttled=False,
    )
    cap, wait = pacer.allowance(now, inflight_entries=0)
    assert cap == 7 and wait == 0  # 1000 points / 140 per write
    pacer.enforced = True
    pacer.observe('"fhirInteractions";r=20;t=5', entries=7, searches=0, now=now + 1, throttled=False)
    cap, wait = pacer.allowance(now + 1, 0)
    assert cap == 0 and wait == pytest.approx(5.05)
    assert pacer.used == pytest.approx(20 + 980)  # the first search (estimated), then the delta


def test_pacer_probe_detects_quota_off() -> None:
    pacer, now = Pacer(), 0.0
    pacer.observe('"fhirInteractions";r=100;t=50', entries=0, searches=0, now=now, throttled=False)
    assert pacer.allowance(now, 0, want=100) == (None, 0.0)  # the probe: a whole Bundle past the budget
    assert pacer.allowance(now, 100, want=100) == (0, 0.0)  # one probe at a time
    pacer.probe_out = False  # (the sender clears it when the probe's answer is in)
    pacer.observe('"fhirInteractions";r=0;t=50', entries=1, searches=0, now=now, throttled=False)
    assert pacer.enforced is False
    assert pacer.allowance(now, 0) == (None, 0.0)  # r=0 alone is not throttling


class CountingServer:
    """A Medplum-like budget: 100 points per write in windows of `window` s (clock-driven), the
    `RateLimit` header counting down to r=0 (docs/medplum.md "Quotas and 429"); `enforce` refuses the
    entries past the budget with 429 (the rest of the Bundle too, docs/medplum.md, recorded case 28)."""

    def __init__(self, clock: FakeClock, budget: int, *, enforce: bool, window: float = 60.0) -> None:
        self.clock, self.budget, self.enforce, self.window = clock, budget, enforce, window
        self.start = clock.now()
        self.spent = 0
        self.throttled_answers = 0
        self.created: list[str] = []

    def __call__(self, entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        if self.clock.now() - self.start >= self.window:
            self.start, self.spent = self.clock.now(), 0
        statuses: list[dict[str, Any]] = []
        for e in entries:
            if self.enforce and self.spent + 100 > self.budget:  # and every later entry
                statuses.append(throttled(int(1000 * (self.start + self.window - self.clock.now()))))
                continue
            self.spent += 100
            sid = e["request"]["url"].rsplit("|", 1)[-1]
            self.created.append(sid)
            statuses.append({"status": "201", "location": f"Patient/m-{sid}"})
        if any(s["status"] == "429" for s in statuses):
            self.throttled_answers += 1
        left = max(0, self.budget - self.spent)
        reset = math.ceil(self.start + self.window - self.clock.now())  # whole seconds, rounded up
        return 200, response(statuses), {"RateLimit": f'"fhirInteractions";r={left};t={reset}'}


def test_sender_on_a_quota_that_is_off_keeps_bundles_whole() -> None:
    # docs/medplum.md: a project with the quota off still counts `fhirInteractions` down to r=0 and
    # refuses nothing. The budget running out must not shrink Bundles (a round trip per step):
    # one whole Bundle past it is the probe that tells the quota is off.
    clock = FakeClock()
    fake = CountingServer(clock, budget=2_500, enforce=False)
    client, seen = server(fake)
    sender = make(client, clock, max_concurrency=2)
    for i in range(100):
        sender.add(entry(i))
    sender.flush()
    assert [len(b) for b in seen] == [10] * 10
    assert sender.pacer.enforced is False
    assert sorted(fake.created) == sorted(str(i) for i in range(100)) and not clock.slept


def test_sender_on_an_enforced_quota_learns_it_from_one_probe() -> None:
    clock = FakeClock()
    fake = CountingServer(clock, budget=2_500, enforce=True, window=6.0)
    client, _ = server(fake)
    reports = Reports()
    sender = make(client, clock)  # one Bundle at a time: with more, answers can overtake
    for i in range(100):
        sender.add(entry(i))
    reports.flush(sender)
    assert sender.pacer.enforced is True
    assert fake.throttled_answers == 1  # the probe; after it, paced from the header
    assert sorted(fake.created) == sorted(str(i) for i in range(100))  # each written once
    assert sorted(sid for sid, kind, _ in reports.done) == sorted(str(i) for i in range(100))
    assert sum(clock.slept) >= 6.0 * 3  # 100 writes at 25 per window


def test_pacer_throttle_holds_everything() -> None:
    pacer = Pacer()
    pacer.throttle(3.0, now=10.0)
    assert pacer.allowance(11.0, 0) == (0, 2.0)
    assert pacer.search_wait(11.0) == 2.0
    assert pacer.allowance(13.5, 0) == (None, 0.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            '"requests";r=59935;t=5, "fhirInteractions";r=0;t=5',
            {"requests": (59935, 5.0), "fhirInteractions": (0, 5.0)},
        ),
        ('"requests";r=159;t=60', {"requests": (159, 60.0)}),
        (None, {}),
        ("garbage", {}),
    ],
)
def test_parse_ratelimit(header: str | None, expected: dict[str, tuple[int, float]]) -> None:
    assert parse_ratelimit(header) == expected


def _answer_log(sender: BatchSender, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many Bundles had been sent when each answer was read, in order (the sender reads a
    batch-response's entries, then feeds its RateLimit to the client's pacer)."""
    log: list[int] = []
    observe = MedplumClient.observe_bundle

    def record(client: MedplumClient, ratelimit: str | None, entries: int, throttled: bool) -> None:
        log.append(sender.stats.bundles)
        observe(client, ratelimit, entries, throttled)

    monkeypatch.setattr(MedplumClient, "observe_bundle", record)
    return log


@pytest.mark.parametrize(
    ("headers", "count", "expected"),
    [
        # A freed slot takes the next ready Bundle at once: reading a hundred outcomes takes the
        # loader milliseconds the server would sit idle for ("1" goes before "0"'s answer is read).
        ({}, 3, [2, 3, 3]),
        # Under a quota the answer's RateLimit decides what may go next: after the first answer
        # (before it no budget is known), each answer is read first.
        ({"RateLimit": '"requests";r=59000;t=60, "fhirInteractions";r=40000;t=60'}, 4,
         [2, 2, 3, 4]),
    ],
)  # fmt: skip
def test_sender_sends_the_next_ready_bundle_before_reading_an_answer_unless_a_quota_applies(
    headers: dict[str, str], count: int, expected: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = server(lambda entries, n: (200, response(created(entries)), headers))
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, max_entries=1, max_concurrency=1)  # one Bundle per entry, in order
    log = _answer_log(sender, monkeypatch)
    for i in range(count):
        sender.add(entry(i))
    reports.flush(sender)
    assert log == expected
    assert [sid for sid, _, _ in reports.done] == [str(i) for i in range(count)]


def test_sender_lets_the_caller_prepare_entries_while_bundles_are_in_flight() -> None:
    """add() returns while fewer than two Bundles are ready: waiting for an answer with an empty
    queue left a slot idle at every answer while the next Bundle was being prepared."""
    gate = threading.Event()
    released: list[bool] = []

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        released.append(gate.wait(timeout=10))  # the timeout only keeps a regression from hanging
        return 200, response(created(entries)), {}

    client, _ = server(answer)
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, max_entries=1, max_concurrency=1)
    sender.add(entry(0))  # in flight, held at the server
    sender.add(entry(1))  # one Bundle ready: the caller goes on
    gate.set()
    sender.add(entry(2))  # two ready, the slot taken: now it waits for an answer
    reports.flush(sender)
    assert released == [True, True, True]
    assert sorted(sid for sid, _, _ in reports.done) == ["0", "1", "2"]


def test_sender_poll_takes_in_answers_without_sending_a_partial_bundle() -> None:
    client, _ = server(lambda entries, n: (200, response(created(entries)), {}))
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, max_entries=2, max_concurrency=2)
    sender.add(entry(0))
    sender.add(entry(1))  # a full Bundle: sent
    sender.add(entry(2))  # a partial one: stays queued
    for _ in range(10_000):  # until the worker has the answer; poll must take it in
        sender.poll()
        reports.take(sender)
        if reports.done:
            break
        time.sleep(0.001)
    assert sorted(sid for sid, _, _ in reports.done) == ["0", "1"]
    assert sender.stats.bundles == 1  # the partial Bundle was not sent by a poll
    reports.flush(sender)
    assert sender.stats.bundles == 2


def test_concurrency_aimd() -> None:
    c = Concurrency(maximum=4)
    for _ in range(20):
        c.clean(entries=100, elapsed=1.0, inflight=1)
    assert c.slots == 4
    c.congested()
    assert c.slots == 2
    for _ in range(5):  # four at once, each 10x slower: worse than one at a time
        c.clean(entries=100, elapsed=10.0, inflight=4)
    assert c.limit < 2


def test_concurrency_one_slow_bundle_among_ordinary_ones_does_not_back_off() -> None:
    """On a busy server one Bundle's time swings several-fold; the median of a window decides."""
    c = Concurrency(maximum=4)
    for elapsed in (1.0, 1.1, 0.9, 1.0, 1.2):
        c.clean(entries=100, elapsed=elapsed * 4, inflight=4)
    for elapsed in (1.0, 9.0, 1.1, 0.9, 1.0, 1.2, 1.0, 8.5, 1.0, 1.1):
        c.clean(entries=100, elapsed=elapsed * 4, inflight=4)
        assert c.slots == 4
    for _ in range(5):  # a window that is slow throughout is a slower server
        c.clean(entries=100, elapsed=40.0, inflight=4)
    assert c.slots == 3


def test_concurrency_not_judged_on_latency_measured_before_a_halving() -> None:
    c = Concurrency(maximum=4)
    for _ in range(5):
        c.clean(entries=100, elapsed=1.0, inflight=1)
    for _ in range(4):
        c.clean(entries=100, elapsed=40.0, inflight=4)
    c.congested()
    assert c.slots == 2
    for _ in range(5):  # judged on these alone: the four slow ones were at the old concurrency
        c.clean(entries=100, elapsed=2.0, inflight=2)
    assert c.slots == 4


def test_sender_create_queued_behind_inflight_write_is_released_not_posted_again() -> None:
    """A POST of an identity whose other write is in flight waits; once that write settles the
    caller decides again (PUT by id), so a second create (a duplicate) is never sent."""

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        statuses = [{"status": "201" if e["request"]["method"] == "POST" else "200",
                     "location": "Patient/m-7"} for e in entries]  # fmt: skip
        return 200, response(statuses), {}

    client, seen = server(answer)
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, max_entries=1, max_concurrency=2)
    sender.concurrency.limit = 2.0  # the first Bundle stays in flight while the second add comes
    sender.add(Entry("Patient", "7", "POST", "Patient", b'{"resourceType":"Patient"}'))
    sender.add(Entry("Patient", "7", "POST", "Patient", b'{"resourceType":"Patient","gender":"male"}'))
    reports.known.add("7")
    reports.flush(sender)
    assert reports.released == ["7"]
    assert [[e["request"]["method"] + " " + e["request"]["url"] for e in b] for b in seen] == [
        ["POST Patient"],
        ["PUT Patient/m-7"],
    ]


def test_sender_reports_an_entry_replaced_by_a_newer_one_of_its_identity_as_superseded() -> None:
    """Every entry added ends in exactly one report: the caller's ledger of what is in flight
    (pfsync.load.pending) counts on it."""
    gate = threading.Event()

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        gate.wait(timeout=10)  # the timeout only keeps a regression from hanging
        return 200, response(created(entries)), {}

    client, seen = server(answer)
    reports, clock = Reports(), FakeClock()
    sender = make(client, clock, max_entries=1, max_concurrency=1)
    sender.add(entry(0, b'{"resourceType":"Patient","v":1}'))  # in flight, held at the server
    sender.add(entry(0, b'{"resourceType":"Patient","v":2}'))  # waits for the write in flight
    sender.add(entry(0, b'{"resourceType":"Patient","v":3}'))  # replaces v2, which is never sent
    sender.add(entry(1, b'{"resourceType":"Patient","v":1}'))  # queued
    sender.add(entry(1, b'{"resourceType":"Patient","v":2}'))  # replaces it in the queue
    gate.set()
    reports.flush(sender)
    assert sorted(reports.superseded_) == ["0", "1"]
    assert sorted(sid for sid, _, _ in reports.done) == ["0", "0", "1"]
    assert sorted(e["resource"]["v"] for bundle in seen for e in bundle) == [1, 2, 3]


def test_sender_keeps_its_reports_when_it_stops_mid_call() -> None:
    """A stop drains the Bundles on the wire and raises: their reports wait for the caller all the
    same, and what was never sent is reported as nothing (it is still the caller's, in flight)."""
    stop = threading.Event()
    gate = threading.Event()

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        gate.wait(timeout=10)  # the timeout only keeps a regression from hanging
        return 200, response(created(entries)), {}

    client, seen = server(answer)
    clock = FakeClock()
    sender = make(client, clock, max_entries=1, max_concurrency=1, stop=stop)
    sender.add(entry(0))  # on the wire, held at the server
    sender.add(entry(1))  # queued behind it
    stop.set()
    gate.set()
    with pytest.raises(InterruptedRunError):
        sender.step()
    reports = sender.take_reports()
    assert [(type(r), r.entry.sid) for r in reports] == [(Settled, "0")]
    assert len(seen) == 1


def test_sender_keeps_the_reports_made_before_medplum_refused_our_credentials() -> None:
    """A 401 raises from the middle of reading answers: the answers read before it stay reported."""

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        if entries[0]["request"]["url"].endswith("|1"):
            time.sleep(0.05)  # answered second
            return 401, {"resourceType": "OperationOutcome", "issue": []}, {}
        return 200, response(created(entries)), {}

    client, seen = server(answer)
    sender = make(client, FakeClock(), max_entries=1, max_concurrency=2)
    sender.concurrency.limit = 2.0  # both Bundles on the wire at once
    sender.add(entry(0))
    sender.add(entry(1))
    with pytest.raises(HTTPError):
        for _ in range(10_000):  # until the 401 is read
            sender.step()
            time.sleep(0.001)
    reports = sender.take_reports()
    assert [(type(r), r.entry.sid) for r in reports] == [(Settled, "0")]
    assert len(seen) == 2


def test_sender_a_released_create_given_back_waits_behind_a_retry_of_its_identity_on_the_wire() -> None:
    """Between its release and its return, the retry of the write it waited for can go on the wire
    (a call that reads answers sends too): given back, it waits again, never in a second Bundle of
    its identity at once."""
    retry_gate = threading.Event()
    lock = threading.Lock()
    on_wire = {"now": 0, "most": 0}

    def answer(entries: list[dict[str, Any]], n: int) -> tuple[int, Any, dict[str, str]]:
        with lock:
            on_wire["now"] += 1
            on_wire["most"] = max(on_wire["most"], on_wire["now"])
        if n == 2:
            retry_gate.wait(timeout=10)  # the timeout only keeps a regression from hanging
        with lock:
            on_wire["now"] -= 1
        if n == 1:
            conflict = {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "conflict", "details": {"text": "could not serialize access"}}]}  # fmt: skip
            return 200, response([{"status": "409", "outcome": conflict}]), {}
        return 200, response([{"status": "200", "location": "Patient/m-7"}]), {}

    client, seen = server(answer)
    sender = make(client, FakeClock(), max_entries=1, max_concurrency=2)
    sender.concurrency.limit = 2.0
    sender.add(Entry("Patient", "7", "PUT", "Patient/m-7", b'{"resourceType":"Patient","v":1}'))
    sender.add(Entry("Patient", "7", "POST", "Patient", b'{"resourceType":"Patient","v":2}'))  # waits
    reports: list[Report] = []
    for _ in range(10_000):  # until it reads the 409: the PUT is queued again, the POST released,
        sender.nudge()  # and the same call sends the retry
        reports += sender.take_reports()
        if reports:
            break
        time.sleep(0.001)
    assert [(type(r), r.entry.sid) for r in reports] == [(Released, "7")]
    released = reports[0].entry
    released.retarget("PUT", "Patient/m-7")
    sender.requeue(released)
    sender.concurrency.limit = 2.0  # (the 409 halved it): a slot is free for it
    sender.nudge()  # must not send it while the retry is on the wire
    retry_gate.set()
    sender.flush()
    assert on_wire["most"] == 1
    assert [[e["resource"]["v"] for e in b] for b in seen] == [[1], [1], [2]]
    assert [(type(r), r.entry.method) for r in sender.take_reports()] == [(Settled, "PUT")] * 2
