"""The loader against the target sandbox over real HTTP: identity, references, re-syncs, crashes."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import orjson
import pytest
from load_helpers import SYNTHEA_SMALL, fixture_types, identity_counts, load_all, make_loader, write_ndjson
from refcheck import check_references
from target_fixtures import fhir_client

from pfsync.core.errors import InterruptedRunError
from pfsync.core.settings import LoadSettings, load_settings
from pfsync.sandbox.target.server import TargetSandbox

TOTAL = 4904
# A closed subset (Patients and everything their Encounters/Conditions reference) for the slower cases.
SUBSET = [
    SYNTHEA_SMALL / f"{t}.ndjson"
    for t in ("Patient", "Organization", "Practitioner", "Encounter", "Condition")
]
SUBSET_TOTAL = 17 + 36 + 36 + 431 + 86


def _write_requests(target: TargetSandbox) -> int:
    return sum(
        n
        for (method, _kind), n in target.stats.requests.items()
        if method in ("POST", "PUT", "DELETE") and _kind != "token"
    )


@pytest.mark.parametrize("mode", ["direct", "conditional"])
def test_load_synthea_small_resolves_every_reference_then_resync_writes_nothing(
    target: TargetSandbox, tmp_path: Path, mode: str
) -> None:
    first = load_all(target, tmp_path, [SYNTHEA_SMALL], mode=mode)
    assert first.total("created") == TOTAL
    assert first.quarantined == 0 and first.retry_queued == 0
    assert target.count() == TOTAL
    assert check_references(target) == []
    assert set(identity_counts(target, fixture_types()).values()) == {1}

    writes_before, requests_before = target.stats.writes, _write_requests(target)
    second = load_all(target, tmp_path, [SYNTHEA_SMALL], mode=mode)
    assert second.total("unchanged") == TOTAL
    assert target.stats.writes == writes_before
    assert _write_requests(target) == requests_before  # zero write requests: skipped by content hash
    assert second.requests == 0


def test_load_with_tiny_memory_budgets_lands_everything_then_resync_writes_nothing(
    target: TargetSandbox, tmp_path: Path
) -> None:
    # Issue 19: past load.idmap_cache_bytes the id map answers from disk, past load.park_max_bytes
    # resources wait for their targets on disk: the outcome is the same, only memory differs.
    tiny = LoadSettings(idmap_cache_bytes=16 * 1024, park_max_bytes=16 * 1024)
    first = load_all(target, tmp_path, SUBSET, settings=tiny)
    assert first.total("created") == SUBSET_TOTAL
    assert first.quarantined == 0 and first.retry_queued == 0
    assert target.count() == SUBSET_TOTAL
    assert check_references(target) == []
    assert set(identity_counts(target, ["Patient", "Encounter", "Condition"]).values()) == {1}
    writes_before = target.stats.writes
    second = load_all(target, tmp_path, SUBSET, settings=tiny)
    assert second.total("unchanged") == SUBSET_TOTAL
    assert target.stats.writes == writes_before and second.requests == 0


def test_load_lost_idmap_is_rebuilt_by_search_without_writes(target: TargetSandbox, tmp_path: Path) -> None:
    load_all(target, tmp_path, SUBSET)
    (tmp_path / "default" / "idmap.sqlite").unlink()
    for extra in (tmp_path / "default").glob("idmap.sqlite-*"):
        extra.unlink()
    writes = _write_requests(target)
    again = load_all(target, tmp_path, SUBSET)
    assert again.total("unchanged") == SUBSET_TOTAL
    assert _write_requests(target) == writes
    assert target.count() == SUBSET_TOTAL


def test_load_files_in_any_order_one_at_a_time(target: TargetSandbox, tmp_path: Path) -> None:
    files = sorted(SYNTHEA_SMALL.glob("*.ndjson"), key=lambda p: p.stat().st_size, reverse=True)
    with make_loader(target, tmp_path) as loader:
        for path in files:  # Observation first: its targets do not exist yet
            loader.load_file(path)
        result = loader.finish()
    assert result.total("created") == TOTAL
    assert check_references(target) == []
    assert result.logical_references == 0


def test_load_stopped_midway_then_rerun_has_no_duplicates(target: TargetSandbox, tmp_path: Path) -> None:
    stop = threading.Event()
    calls = {"n": 0}
    original = target.app.max_json_size  # any attribute: we stop from the event sink instead

    class StopAfter:
        def emit(self, event: str, /, **detail: object) -> None:
            if event == "load_progress":
                calls["n"] += 1
                if calls["n"] >= 3:
                    stop.set()

    with (
        pytest.raises(InterruptedRunError),
        make_loader(target, tmp_path, stop=stop, events=StopAfter()) as loader,
    ):
        loader.load_paths([SYNTHEA_SMALL])
        loader.finish()
    assert 0 < target.count() < TOTAL
    assert target.app.max_json_size == original
    result = load_all(target, tmp_path, [SYNTHEA_SMALL])
    assert result.quarantined == 0
    assert target.count() == TOTAL
    assert set(identity_counts(target, fixture_types()).values()) == {1}
    assert check_references(target) == []


def test_load_serialization_conflicts_are_retried_without_duplicates(
    target: TargetSandbox, tmp_path: Path
) -> None:
    target.faults.set_conflicts(0.3, seed=7)
    result = load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson", SYNTHEA_SMALL / "Encounter.ndjson",
                                         SYNTHEA_SMALL / "Organization.ndjson", SYNTHEA_SMALL / "Practitioner.ndjson"])  # fmt: skip
    assert result.stats["conflicts"] > 0
    assert result.quarantined == 0 and result.retry_queued == 0
    assert target.count() == 17 + 431 + 36 + 36
    assert set(identity_counts(target, ["Patient", "Encounter"]).values()) == {1}


def test_load_too_large_answers_split_the_bundle(target: TargetSandbox, tmp_path: Path) -> None:
    load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson"])  # a warm id map: no searches first
    target.faults.too_large_next(2)  # the fault hits whatever request comes next: our Bundles
    result = load_all(target, tmp_path, [SYNTHEA_SMALL / "Encounter.ndjson"], mode="conditional")
    assert result.stats["splits"] == 2
    assert result.total("created") == 431 and result.quarantined == 0
    assert target.count("Encounter") == 431


def test_load_real_body_limit_splits_by_bytes(target: TargetSandbox, tmp_path: Path) -> None:
    target.max_json_size = 150_000  # smaller than our Bundle cap: the server refuses, we split
    result = load_all(
        target,
        tmp_path,
        [SYNTHEA_SMALL / "Observation.ndjson"],
        settings=LoadSettings(bundle_max_bytes=400_000),
    )
    assert result.total("created") + result.total("unchanged") == 2339
    assert result.quarantined == 0
    assert target.count("Observation") == 2339


def test_load_server_errors_and_resets_are_retried(target: TargetSandbox, tmp_path: Path) -> None:
    target.faults.error_next(2, status=503)
    target.faults.reset_next(1)
    from load_helpers import FakeClock

    result = load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson", SYNTHEA_SMALL / "Organization.ndjson",
                                         SYNTHEA_SMALL / "Practitioner.ndjson"], clock=FakeClock())  # fmt: skip
    assert result.quarantined == 0 and result.retry_queued == 0
    assert target.count() == 17 + 36 + 36
    assert set(identity_counts(target, ["Patient", "Organization", "Practitioner"]).values()) == {1}


def test_load_validation_and_multiple_matches_are_quarantined(target: TargetSandbox, tmp_path: Path) -> None:
    from target_fixtures import fhir_client

    system = "https://practicefusion.com/fhir/patient-id"
    with fhir_client(target) as client:
        for _ in range(2):
            r = client.post(
                "Patient",
                json={
                    "resourceType": "Patient",
                    "identifier": [{"system": system, "value": "dup"}],
                    # two copies that are both this source's (a stranger would be left alone)
                    "meta": {"tag": [{"system": "https://pfsync.dev/source", "code": "default"}]},
                },
            )
            assert r.status_code == 201
    data = write_ndjson(
        tmp_path / "Patient.ndjson",
        [
            {"resourceType": "Patient", "id": "ok-1", "gender": "female"},
            {"resourceType": "Patient", "id": "bad-1", "foo": "bar"},
            {"resourceType": "Patient", "id": "dup", "gender": "male"},
            {"resourceType": "Patient", "gender": "male"},
        ],
    )
    with data.open("ab") as fh:
        fh.write(b"{not json\n")
    result = load_all(target, tmp_path, [data])
    assert result.total("created") == 1
    assert result.quarantined == 4
    lines = (tmp_path / "default" / "quarantine.ndjson").read_text().splitlines()
    reasons = " | ".join(lines)
    assert (
        "foo" in reasons
        and "carry identifier" in reasons
        and "no id" in reasons
        and "not valid JSON" in reasons
    )
    assert '"line":2' in reasons


def test_load_quarantine_file_replays(target: TargetSandbox, tmp_path: Path) -> None:
    data = write_ndjson(
        tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": "x", "birthDate": "02/01/1980"}]
    )
    assert load_all(target, tmp_path, [data]).quarantined == 1
    qfile = tmp_path / "default" / "quarantine.ndjson"
    # Someone fixes the line in the quarantine file, then replays it.
    qfile.write_text(qfile.read_text().replace("02/01/1980", "1980-02-01"))
    result = load_all(target, tmp_path, [qfile])
    assert result.total("created") == 1 and result.quarantined == 0
    assert target.count("Patient") == 1
    assert not qfile.exists() or qfile.read_text() == ""


def test_load_dry_run_writes_nothing(target: TargetSandbox, tmp_path: Path) -> None:
    files = [SYNTHEA_SMALL / "Patient.ndjson", SYNTHEA_SMALL / "Organization.ndjson"]
    result = load_all(target, tmp_path, files, dry_run=True)
    assert result.total("created") == 17 + 36
    assert target.count() == 0 and _write_requests(target) == 0
    load_all(target, tmp_path, files)
    changed = write_ndjson(tmp_path / "Patient.ndjson", [
        {**__import__("orjson").loads(line), "gender": "other"} if i == 0 else __import__("orjson").loads(line)
        for i, line in enumerate((SYNTHEA_SMALL / "Patient.ndjson").read_bytes().splitlines())
    ])  # fmt: skip
    writes = _write_requests(target)
    dry = load_all(target, tmp_path, [changed], dry_run=True)
    assert dry.total("updated") == 1 and dry.total("unchanged") == 16
    assert _write_requests(target) == writes


def test_load_deleted_file_deletes_in_medplum(target: TargetSandbox, tmp_path: Path) -> None:
    load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson"])
    first_id = __import__("orjson").loads((SYNTHEA_SMALL / "Patient.ndjson").read_bytes().splitlines()[0])[
        "id"
    ]
    deleted = write_ndjson(tmp_path / "deleted.ndjson", [{
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"Patient/{first_id}"}},
                  {"request": {"method": "DELETE", "url": "Patient/never-loaded"}}]}])  # fmt: skip
    with make_loader(target, tmp_path) as loader:
        loader.apply_deleted(deleted)
        result = loader.finish()
    assert result.total("deleted") == 2
    assert target.count("Patient") == 16
    # Without an id map the deletion goes by identifier.
    shutil.rmtree(tmp_path / "default")
    load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson"])
    shutil.rmtree(tmp_path / "default")
    with make_loader(target, tmp_path) as loader:
        loader.apply_deleted(deleted)
        loader.finish()
    assert target.count("Patient") == 16


@pytest.mark.parametrize(("mode", "patients"), [("ignore", 17), ("tag", 17)])
def test_load_deletes_ignore_and_tag(target: TargetSandbox, tmp_path: Path, mode: str, patients: int) -> None:
    load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson"])
    first_id = __import__("orjson").loads((SYNTHEA_SMALL / "Patient.ndjson").read_bytes().splitlines()[0])[
        "id"
    ]
    deleted = write_ndjson(tmp_path / "deleted.ndjson", [{"resourceType": "Bundle", "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"Patient/{first_id}"}}]}])  # fmt: skip
    with make_loader(target, tmp_path, settings=LoadSettings(deletes=mode)) as loader:  # type: ignore[arg-type]
        loader.apply_deleted(deleted)
        loader.finish()
    assert target.count("Patient") == patients
    tagged = [
        p
        for p in target.resources("Patient")
        if any(t.get("code") == "deleted" for t in p["meta"].get("tag", []))
    ]
    assert len(tagged) == (1 if mode == "tag" else 0)


def test_load_respects_fixture_env(tmp_path: Path) -> None:
    assert os.environ.get("PF_FHIR_BASE_URL") is None


@pytest.mark.parametrize(
    ("env", "methods"),
    [({}, {"POST Patient"}), ({"PFSYNC_UPSERT_MODE": "conditional"}, {"PUT Patient?identifier"})],
    ids=["direct", "conditional"],
)
def test_load_upsert_mode_setting_chooses_the_write(
    target: TargetSandbox, tmp_path: Path, env: dict[str, str], methods: set[str]
) -> None:
    settings = load_settings(env={"PFSYNC_STATE_DIR": str(tmp_path), **env}).load
    client = fhir_client(target)
    sent: set[str] = set()

    def capture(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path.endswith("/fhir/R4/"):
            for e in orjson.loads(request.content)["entry"]:
                sent.add(f"{e['request']['method']} {e['request']['url'].split('=')[0]}")

    client.event_hooks["request"] = [capture]
    result = load_all(target, tmp_path, [SYNTHEA_SMALL / "Patient.ndjson"], settings=settings, client=client)
    assert result.total("created") == 17
    assert sent == methods


def test_load_flush_then_crash_then_later_run_writes_the_held_resources_once(
    target: TargetSandbox, tmp_path: Path
) -> None:
    """flush(): every resource given so far is in Medplum or held in the id map; a process that dies
    right after (no finish) loses nothing, and the next run writes the held ones once."""
    with make_loader(target, tmp_path) as loader:
        loader.load_file(SYNTHEA_SMALL / "Condition.ndjson")  # its Encounters have not come: held
        loader.load_file(SYNTHEA_SMALL / "Patient.ndjson")
        loader.flush()
        assert target.count("Patient") == 17 and target.count("Condition") == 0
        loader.mark_loaded("condition-file")
        loader.mark_loaded("patient-file")
        # dies here: no finish()
    with make_loader(target, tmp_path) as loader:
        assert loader.is_loaded("condition-file") and loader.is_loaded("patient-file")
        assert not loader.is_loaded("encounter-file")
        for name in ("Organization", "Practitioner", "Encounter"):
            loader.load_file(SYNTHEA_SMALL / f"{name}.ndjson")
        result = loader.finish()
    assert target.count() == SUBSET_TOTAL
    assert target.stats.writes == SUBSET_TOTAL  # each once: no Condition written early and again
    assert result.total("updated") == 0 and result.logical_references == 0
    assert (
        check_references(target, ["Patient", "Organization", "Practitioner", "Encounter", "Condition"]) == []
    )
