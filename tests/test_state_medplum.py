"""The Medplum state backend over real HTTP against the target sandbox: Basic by identifier,
If-Match writes, the lease, and adopting the seed integration's Parameters checkpoint."""

from __future__ import annotations

import httpx
import pytest
from target_fixtures import TARGET_CLIENT, TARGET_SECRET

from pfsync.errors import LockedError, StateError
from pfsync.sandbox.target import TargetSandbox
from pfsync.state import Holder, InFlight, SyncState
from pfsync.state_medplum import STATE_SYSTEM, MedplumStateStore, find_seed_checkpoint

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
    return MedplumStateStore(client, target.fhir_url, clock=clock or FakeClock(), lease_ttl=600)


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


def test_medplum_store_corrupt_extension_is_state_error(target: TargetSandbox) -> None:
    client = httpx.Client(auth=httpx.BasicAuth(TARGET_CLIENT, TARGET_SECRET))
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
    assert find_seed_checkpoint(client, target.fhir_url) == expected
