"""The Medplum state backend over real HTTP against the target sandbox: Basic by identifier,
If-Match writes, the lease, and adopting the Medplum Practice Fusion bot integration's Parameters checkpoint."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import closed_at_end
from target_fixtures import TARGET_CLIENT, TARGET_SECRET, medplum_of

from pfsync.core.errors import LockedError, StateError
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.sync.holders import Holder
from pfsync.sync.lock import new_lease
from pfsync.sync.state import InFlight, SyncState
from pfsync.sync.state_medplum import STATE_SYSTEM, MedplumStateStore, find_seed_checkpoint

ME = Holder(1, "pod-a", "2026-01-01T00:00:00.000Z")
OTHER = Holder(2, "pod-b", "2026-01-01T00:00:00.000Z")


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def _store(target: TargetSandbox, clock: FakeClock | None = None) -> MedplumStateStore:
    client = httpx.Client(auth=httpx.BasicAuth(TARGET_CLIENT, TARGET_SECRET), timeout=30)
    return MedplumStateStore(
        medplum_of(client, fhir_url=target.fhir_url, clock=clock or FakeClock()), lease_ttl=600
    )


def test_medplum_store_empty_then_round_trip(target: TargetSandbox) -> None:
    store = _store(target)
    assert store.load("a") == SyncState(source="a")
    state = SyncState(source="a", transaction_time="2026-01-01T00:00:00.000Z",
                      in_flight=InFlight("full", "exports/x", None, "2026-01-01T00:00:00.000Z"))  # fmt: skip
    store.save(state)
    store.save(state)
    assert _store(target).load("a") == state  # another pod (fresh store) sees it
    found = target.find_by_identifier("Basic", STATE_SYSTEM, "a")
    assert len(found) == 1
    assert found[0]["meta"]["versionId"]


def test_medplum_store_sources_are_separate(target: TargetSandbox) -> None:
    store = _store(target)
    store.save(SyncState(source="a", transaction_time="2026-01-01T00:00:00.000Z"))
    store.save(SyncState(source="b", transaction_time="2026-02-01T00:00:00.000Z"))
    assert store.load("a").transaction_time == "2026-01-01T00:00:00.000Z"
    assert store.load("b").transaction_time == "2026-02-01T00:00:00.000Z"
    assert len(target.resources("Basic")) == 2


def test_medplum_store_lease_refuses_second_pod(target: TargetSandbox) -> None:
    clock = FakeClock()
    pod_a, pod_b = _store(target, clock), _store(target, clock)
    lock = pod_a.acquire("a", ME)
    with pytest.raises(LockedError, match="pod-a"):
        pod_b.acquire("a", OTHER)
    assert pod_b.lease_of("a") is not None
    lock.release()
    assert pod_b.holder("a") is None
    pod_b.acquire("a", OTHER).release()


def test_medplum_store_expired_lease_can_be_taken(target: TargetSandbox) -> None:
    clock = FakeClock()
    _store(target, clock).acquire("a", ME)  # never released: a crashed pod
    clock.t += 601
    _store(target, clock).acquire("a", OTHER).release()


def test_medplum_store_save_keeps_and_renews_own_lease(target: TargetSandbox) -> None:
    clock = FakeClock()
    pod_a, pod_b = _store(target, clock), _store(target, clock)
    lock = pod_a.acquire("a", ME)
    clock.t += 500
    pod_a.save(SyncState(source="a", transaction_time="2026-01-01T00:00:00.000Z"))  # renews
    clock.t += 500  # past the first expiry, inside the renewed one
    with pytest.raises(LockedError):
        pod_b.acquire("a", OTHER)
    lock.release()


def test_medplum_store_stale_version_is_refused_by_if_match(target: TargetSandbox) -> None:
    clock = FakeClock()
    pod_a, pod_b = _store(target, clock), _store(target, clock)
    pod_a.save(SyncState(source="a"))
    pod_b.acquire("a", OTHER)  # pod_a's remembered versionId is now stale
    # pod_a's write gets 412, re-reads, sees pod_b's live lease and stops instead of overwriting it.
    with pytest.raises(LockedError, match="pod-b"):
        pod_a.save(SyncState(source="a", transaction_time="2030-01-01T00:00:00.000Z"))
    assert pod_b.load("a").transaction_time is None


class _RacingStore(MedplumStateStore):
    """Every creator waits at the barrier after its search found nothing: all create at once."""

    def __init__(self, target: TargetSandbox, barrier: threading.Barrier) -> None:
        client = httpx.Client(auth=httpx.BasicAuth(TARGET_CLIENT, TARGET_SECRET), timeout=30)
        super().__init__(medplum_of(client, fhir_url=target.fhir_url, clock=FakeClock()), lease_ttl=600)
        self.barrier = barrier

    def _create(self, state: SyncState) -> bool:
        self.barrier.wait(timeout=30)
        return super()._create(state)


def test_medplum_store_two_pods_creating_at_once_make_one_record(target: TargetSandbox) -> None:
    """Criterion 5 of issue 14: both searches find nothing, both create at once; If-None-Exist
    (docs/medplum.md, recorded case 49) lets one create the record and shows the other that one, with its lease."""
    barrier = threading.Barrier(2)
    pods = [_RacingStore(target, barrier) for _ in range(2)]
    holders = [Holder(n, f"pod-{n}", "2026-01-01T00:00:00.000Z") for n in range(2)]
    outcomes: list[object] = [None, None]

    def take(n: int) -> None:
        try:
            outcomes[n] = pods[n].acquire("a", holders[n])
        except LockedError as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=take, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    locks = [o for o in outcomes if not isinstance(o, LockedError)]
    refused = [o for o in outcomes if isinstance(o, LockedError)]
    assert len(locks) == 1 and len(refused) == 1, outcomes
    assert len(target.find_by_identifier("Basic", STATE_SYSTEM, "a")) == 1
    winner = outcomes.index(locks[0])
    assert f"pod-{winner}" in str(refused[0])
    assert pods[1 - winner].lease_of("a") is not None


def test_medplum_store_two_savers_creating_at_once_make_one_record(target: TargetSandbox) -> None:
    barrier = threading.Barrier(2)
    pods = [_RacingStore(target, barrier) for _ in range(2)]
    times = ["2026-01-01T00:00:00.000Z", "2026-02-01T00:00:00.000Z"]
    errors: list[BaseException] = []

    def save(n: int) -> None:
        try:
            pods[n].save(SyncState(source="a", transaction_time=times[n]))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    (record,) = target.find_by_identifier("Basic", STATE_SYSTEM, "a")
    # The loser of the create saw the winner's record and wrote over it by id (If-Match): the
    # record holds one of the two states, whole.
    assert _store(target).load("a").transaction_time in times
    assert record["id"]


def test_medplum_store_source_names_with_token_characters(target: TargetSandbox) -> None:
    """A source name holding `,` `|` `$` or `\\` is escaped in the search and in If-None-Exist
    (docs/medplum.md, recorded case 48): each name gets its own record, found again by another pod."""
    names = ["a,b", "a|b", "a$b", "a\\b", "a"]
    store = _store(target)
    for n, name in enumerate(names):
        store.save(SyncState(source=name, transaction_time=f"2026-01-0{n + 1}T00:00:00.000Z"))
    other = _store(target)
    for n, name in enumerate(names):
        assert other.load(name).transaction_time == f"2026-01-0{n + 1}T00:00:00.000Z"
        assert len(target.find_by_identifier("Basic", STATE_SYSTEM, name)) == 1


def _recording_store(seen: list[httpx.Request]) -> MedplumStateStore:
    """A store over httpx.MockTransport that answers like Medplum and records every request."""
    stored: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET":
            entries = [{"resource": stored}] if stored else []
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
        body = json.loads(request.content)
        if request.method == "POST":
            body.update(id="5d3e0b24-74e4-46d3-afdb-9b8c6b7be9c6", meta={"versionId": "v1"})
            stored.clear()
            stored.update(body)
            return httpx.Response(201, json=body)
        if body.get("id") != request.url.path.rsplit("/", 1)[-1]:
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "invalid", "details": {"text": "Incorrect resource ID"}}]})  # fmt: skip
        body["meta"] = {"versionId": "v2"}
        stored.update(body)
        return httpx.Response(200, json=body)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    return MedplumStateStore(medplum_of(client, fhir_url="https://medplum.example/fhir/R4/", clock=FakeClock()),
                             lease_ttl=600)  # fmt: skip


def test_medplum_store_create_conflict_is_a_lost_race() -> None:
    """The real server may answer a create that collides with another one 409 (docs/medplum.md,
    "Measured on a real server": serializable transactions): the other pod won, so this one looks at its record
    and stops at its live lease, not with a state error."""
    clock = FakeClock()
    theirs: dict[str, object] = {}
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if request.method == "GET":
            entries = [{"resource": theirs}] if theirs else []
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
        # Created by the other pod between our search and our create.
        theirs.update(store._resource("a", SyncState(source="a", lease=new_lease(OTHER, clock.now(), 600))),
                      id="5d3e0b24-74e4-46d3-afdb-9b8c6b7be9c6", meta={"versionId": "v1"})  # fmt: skip
        return httpx.Response(409, json={"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                              "code": "conflict", "details": {"coding": [{"code": "40001"}]}}]})  # fmt: skip

    client = httpx.Client(transport=httpx.MockTransport(handler))
    store = MedplumStateStore(medplum_of(client, fhir_url="https://medplum.example/fhir/R4/", clock=clock),
                              lease_ttl=600)  # fmt: skip
    with pytest.raises(LockedError, match="pod-b"):
        store.acquire("a", ME)
    assert seen == ["GET", "POST", "GET"]


def test_medplum_store_request_shapes() -> None:
    """POST Basic + If-None-Exist to create (docs/medplum.md, recorded case 49); PUT Basic/<id> with that id in the
    body and a quoted If-Match to update (docs/medplum.md, recorded cases 35, 44)."""
    seen: list[httpx.Request] = []
    store = _recording_store(seen)
    store.save(SyncState(source="a"))
    store.save(SyncState(source="a", transaction_time="2026-01-01T00:00:00.000Z"))
    methods = [(r.method, r.url.path) for r in seen]
    assert methods == [("GET", "/fhir/R4/Basic"), ("POST", "/fhir/R4/Basic"),
                       ("PUT", "/fhir/R4/Basic/5d3e0b24-74e4-46d3-afdb-9b8c6b7be9c6")]  # fmt: skip
    search, create, update = seen
    assert search.url.params["identifier"] == f"{STATE_SYSTEM}|a"
    assert create.headers["If-None-Exist"] == f"identifier={STATE_SYSTEM}|a"
    assert "id" not in json.loads(create.content)
    assert json.loads(update.content)["id"] == "5d3e0b24-74e4-46d3-afdb-9b8c6b7be9c6"
    assert update.headers["If-Match"] == 'W/"v1"'


def test_medplum_store_corrupt_extension_is_state_error(target: TargetSandbox) -> None:
    client = closed_at_end(httpx.Client(auth=httpx.BasicAuth(TARGET_CLIENT, TARGET_SECRET)))
    body = {"resourceType": "Basic", "identifier": [{"system": STATE_SYSTEM, "value": "a"}],
            "code": {"text": "x"}, "extension": [{"url": "https://pfsync.dev/StructureDefinition/sync-state",
                                                   "valueString": "{broken"}]}  # fmt: skip
    r = client.put(target.fhir_url + f"Basic?identifier={STATE_SYSTEM}|a", json=body,
                   headers={"Content-Type": "application/fhir+json"})  # fmt: skip
    assert r.status_code == 201, r.text
    with pytest.raises(StateError, match="not JSON"):
        _store(target).load("a")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([], None),
        ([[{"name": "other", "valueString": "x"}]], None),
        ([[{"name": "lastSyncTime", "valueDateTime": "2025-05-01T00:00:00Z"}]], "2025-05-01T00:00:00Z"),
        (
            [[{"name": "lastSyncTime", "valueDateTime": "2025-05-01T00:00:00Z"}],
             [{"name": "lastSyncTime", "valueString": "2025-06-01T00:00:00Z"}]],
            "2025-06-01T00:00:00Z",
        ),
    ],
)  # fmt: skip
def test_find_seed_checkpoint_picks_last_sync_time(
    target: TargetSandbox, params: list[list[dict[str, str]]], expected: str | None
) -> None:
    client = httpx.Client(auth=httpx.BasicAuth(TARGET_CLIENT, TARGET_SECRET))
    for p in params:
        r = client.post(target.fhir_url + "Parameters", json={"resourceType": "Parameters", "parameter": p},
                        headers={"Content-Type": "application/fhir+json"})  # fmt: skip
        assert r.status_code == 201, r.text
    assert find_seed_checkpoint(medplum_of(client, fhir_url=target.fhir_url)) == expected
