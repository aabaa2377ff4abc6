"""The pending ledger's account of what is in flight (pfsync.load.pending): handed, answered; and the
router keeping it as it takes in the sender's reports (pfsync.load.routing), a stop's included."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from load_helpers import SOURCE, FakeClock

from pfsync.core.errors import HTTPError, InterruptedRunError
from pfsync.core.events import NullSink
from pfsync.load.idmap import IdMap
from pfsync.load.pending import Pending
from pfsync.load.quarantine import QUARANTINE, RETRY, WrappedLog
from pfsync.load.references import References
from pfsync.load.routing import Router
from pfsync.load.tally import Tally
from pfsync.load.transform import TransformContext
from pfsync.medplum.batch import Entry
from pfsync.medplum.client import MedplumClient
from pfsync.medplum.lookup import Searcher
from pfsync.medplum.upsert import BatchSender
from pfsync.net.http import RetryPolicy

PATIENT = ("Patient", "p1")


def test_pending_an_identity_is_in_flight_until_every_entry_handed_is_answered() -> None:
    # Two entries of one identity in the sender (one sent, a newer one waiting for it): the first
    # answer leaves the identity coming; the second ends it.
    pending = Pending()
    assert not pending.holds(PATIENT)
    pending.hand(PATIENT)
    pending.hand(PATIENT)
    assert pending.holds(PATIENT) and pending.in_flight == 2
    pending.answered(PATIENT)
    assert pending.holds(PATIENT, parked=False) and pending.in_flight == 1
    pending.answered(PATIENT)
    assert not pending.holds(PATIENT) and pending.in_flight == 0


# One Bundle's answer: (status, body) from its entries' requests.
Answer = Callable[[list[dict[str, Any]]], tuple[int, Any]]


def ok(entries: list[dict[str, Any]]) -> tuple[int, Any]:
    """Every entry written: a POST Patient of source id <sid> creates Patient/m-<sid>."""
    statuses = []
    for e in entries:
        request = e["request"]
        created = request["method"] == "POST"
        location = f"Patient/m-{e['resource']['sid']}" if created else request["url"]
        statuses.append({"status": "201" if created else "200", "location": location})
    return 200, {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [{"response": s} for s in statuses],
    }


class Rig:
    """A router and its sender over a fake Medplum whose answers wait for `gate`."""

    def __init__(self, tmp_path: Path, answer: Answer, *, stop: threading.Event | None = None) -> None:
        self.gate = threading.Event()
        self.seen: list[str] = []  # "METHOD url" of every entry sent, in order

        def handle(request: httpx.Request) -> httpx.Response:
            entries = orjson.loads(request.content)["entry"]
            self.seen.extend(f"{e['request']['method']} {e['request']['url']}" for e in entries)
            self.gate.wait(timeout=10)  # the timeout only keeps a regression from hanging
            status, body = answer(entries)
            return httpx.Response(status, content=orjson.dumps(body))

        client = httpx.Client(transport=httpx.MockTransport(handle), base_url="http://medplum.test/fhir/R4/")
        clock, retry = FakeClock(), RetryPolicy(retries=3)
        medplum = MedplumClient(client, clock=clock, policy=retry, stop=stop)
        ctx = TransformContext(SOURCE)
        self.idmap = IdMap(tmp_path / "idmap.sqlite", target="test")
        self.pending = Pending()
        refs = References(self.idmap, ctx, None, clock=clock, retry=retry)
        self.counts: dict[str, Counter[str]] = {}
        self.logs = [
            WrappedLog(tmp_path / "quarantine.ndjson", QUARANTINE),
            WrappedLog(tmp_path / "retry.ndjson", RETRY),
        ]
        tally = Tally(
            self.counts, *self.logs, pending=self.pending, refs=refs, events=NullSink(), dry_run=False
        )
        self.sender = BatchSender(medplum, max_bytes=900_000, max_entries=1, max_concurrency=2, clock=clock,
                                  retry=retry, stop=stop)  # fmt: skip
        self.sender.concurrency.limit = 2.0  # two Bundles on the wire from the start
        self.router = Router(ctx, self.idmap, Searcher(medplum), pending=self.pending, refs=refs, tally=tally,
                             events=NullSink(), mode="direct", deletes="apply", dry_run=False,
                             sender=self.sender)  # fmt: skip

    def close(self) -> None:
        self.gate.set()
        self.router.probes.close()
        self.sender.close()
        self.idmap.close()
        for log in self.logs:
            log.close()

    def update(self, sid: str, content_hash: str) -> None:
        """Route a write of an identity the id map knows (an update by id)."""
        self.idmap.record("Patient", sid, f"m-{sid}", "1", "old")
        self.router.route(patient(sid, content_hash))

    def create(self, sid: str, content_hash: str) -> None:
        """Route a write of an identity searched for and not found (a create)."""
        e = patient(sid, content_hash)
        e.looked_up = True
        self.router.route(e)

    def held(self) -> int:
        """The entries the sender holds: queued, waiting behind a write of their identity, on the wire."""
        s = self.sender
        wire = sum(len(b) for b in s._futures.values()) + sum(len(g) for g in s._groups)
        return len(s._buf) + len(s._blocked) + wire

    def in_step(self) -> None:
        """The ledger counts exactly what the sender holds, whenever the router has the hand."""
        assert self.pending.in_flight == self.held()


def patient(sid: str, content_hash: str) -> Entry:
    body = orjson.dumps({"resourceType": "Patient", "sid": sid, "h": content_hash})
    return Entry("Patient", sid, "PUT", "", body, content_hash)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(answer: Answer = ok, **kw: Any) -> Rig:
        rigs.append(Rig(tmp_path, answer, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


@pytest.mark.parametrize(
    ("first", "second_hash", "sent", "outcome"),
    [
        # The create went through: the create that waited behind it becomes an update by id...
        ("201", "h2", ["POST Patient", "PUT Patient/m-c"], {"created": 1, "updated": 3}),
        # ... or nothing, when it has the same content.
        ("201", "h1", ["POST Patient"], {"created": 1, "updated": 2, "unchanged": 1}),
        # The create was refused: the one that waited is routed again from scratch.
        ("400", "h2", ["POST Patient"], {"updated": 2, "quarantined": 1}),
    ],
)
def test_router_ledger_counts_what_the_sender_holds_through_every_report(
    rig: Callable[..., Rig], first: str, second_hash: str, sent: list[str], outcome: dict[str, int]
) -> None:
    def answer(entries: list[dict[str, Any]]) -> tuple[int, Any]:
        if entries[0]["request"]["method"] == "POST" and first != "201":
            oo = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}
            return 200, {"resourceType": "Bundle", "type": "batch-response",
                         "entry": [{"response": {"status": first, "outcome": oo}}]}  # fmt: skip
        return ok(entries)

    r = rig(answer)
    r.update("a", "h1")  # on the wire
    r.in_step()
    r.create("c", "h1")  # on the wire
    r.create("c", second_hash)  # waits behind it; released when it is answered
    r.in_step()
    r.update("b", "h1")  # queued
    r.update("b", "h2")  # replaces it: superseded
    r.in_step()
    assert r.pending.in_flight == 4
    r.gate.set()
    while r.router.step():
        r.in_step()
    assert r.pending.in_flight == 0 and r.held() == 0
    assert [s for s in r.seen if "m-a" not in s and "m-b" not in s] == sent
    assert r.seen.count("PUT Patient/m-b") == 1
    rechecks = r.pending.take_rechecks()
    assert [(e.sid, e.hash) for e in rechecks] == ([("c", second_hash)] if first != "201" else [])
    assert {k: v for k, v in r.counts["Patient"].items() if v} == outcome  # a and b updated, and c


def test_router_steps_on_while_it_gives_a_released_create_back(rig: Callable[..., Rig]) -> None:
    """The sender's step that releases the create finds itself empty; the router's is not over."""
    r = rig()
    r.create("c", "h1")  # on the wire
    r.create("c", "h2")  # waits behind it
    r.gate.set()
    for _ in range(10_000):  # until the answer is back: the next step reads it first thing
        if r.sender._done:
            break
        time.sleep(0.001)
    while r.router.step():
        r.in_step()
    assert r.pending.in_flight == 0
    assert r.seen == ["POST Patient", "PUT Patient/m-c"]


def test_router_takes_in_what_a_stopped_sender_reported(rig: Callable[..., Rig]) -> None:
    """A stop raises from the sender after the writes on the wire are answered: those are recorded
    (the id map, the ledger) before the stop goes on; what was never sent stays in flight in the
    ledger (not settled, so nothing waiting for it is written and no checkpoint passes it)."""
    stop = threading.Event()
    r = rig(stop=stop)
    r.create("a", "h1")  # on the wire
    r.create("b", "h1")  # on the wire
    r.update("c", "h1")  # queued
    stop.set()
    r.gate.set()
    with pytest.raises(InterruptedRunError):
        while r.router.step():
            pass
    for sid in ("a", "b"):
        row = r.idmap.get("Patient", sid)
        assert row is not None and row.mid == f"m-{sid}"
    assert r.pending.in_flight == 1 == r.held()
    assert r.pending.holds(("Patient", "c")) and "PUT Patient/m-c" not in r.seen


def test_router_takes_in_what_the_sender_reported_before_medplum_refused_our_credentials(
    rig: Callable[..., Rig],
) -> None:
    """A 401 raises from the middle of the sender's answers: the ones read before it are recorded;
    the refused write has no outcome and stays in flight in the ledger."""
    refused = threading.Event()

    def answer(entries: list[dict[str, Any]]) -> tuple[int, Any]:
        if entries[0]["resource"]["sid"] == "b":
            refused.wait(timeout=10)  # answered after a's; the timeout only keeps a regression from hanging
            return 401, {"resourceType": "OperationOutcome", "issue": []}
        return ok(entries)

    r = rig(answer)
    r.create("a", "h1")
    r.create("b", "h1")
    r.gate.set()
    with pytest.raises(HTTPError):
        while r.router.step():
            refused.set()
    row = r.idmap.get("Patient", "a")
    assert row is not None and row.mid == "m-a"
    assert r.idmap.get("Patient", "b") is None
    assert r.pending.in_flight == 1 and r.pending.holds(("Patient", "b"))
