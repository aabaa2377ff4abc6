"""Referenced resources the export leaves out stay current (issue 14, criterion 4), over real HTTP
against both sandboxes: the loader with the hints `pfsync sync` gives it for a Patient-level export."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import orjson
from load_helpers import SYNTHEA_SMALL, write_ndjson
from source_fixtures import source_token
from sync_helpers import summary, sync_env
from target_fixtures import medplum_client, medplum_of
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.instants import iso
from pfsync.core.settings import LoadSettings, SourceSettings
from pfsync.load.loader import Loader, LoadResult
from pfsync.load.references import export_types
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.sync.state_medplum import MedplumStateStore

PF = "https://practicefusion.com/fhir/"
WEEK = 7 * 86400.0


def _lines(name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (SYNTHEA_SMALL / f"{name}.ndjson").read_bytes().splitlines()]


def _load(source: SourceSandbox, target: TargetSandbox, state: Path, resources: list[dict[str, Any]],
          name: str, *, after: float = WEEK, refresh: bool = True) -> LoadResult:  # fmt: skip
    """One run over `resources` (as an export delivered them), hinted like `pfsync sync` does; the
    time of the last whole-set pass is kept beside the state directory, as the sync state keeps it."""
    path = write_ndjson(state.parent / f"{name}.ndjson", resources)
    stamp = state.parent / "referenced-refreshed-at"
    settings = LoadSettings(refresh_referenced_after=after)
    client = httpx.Client(headers={"Authorization": f"Bearer {source_token(source)}"}, timeout=30)
    with (
        client,
        Loader(SourceSettings(name="default", base_url=source.base_url()), settings, medplum_client(target),
               state_dir=state, source_client=client) as loader,
    ):  # fmt: skip
        delivered = export_types("patient", ())
        loader.expect_types(delivered)
        if refresh:
            loader.refresh_referenced(delivered, stamp.read_text() if stamp.exists() else None)
        loader.load_file(path)
        result = loader.finish()
        if loader.referenced_refreshed_at is not None:
            stamp.write_text(iso(loader.referenced_refreshed_at))
        return result


def _stored(target: TargetSandbox, rtype: str, sid: str) -> dict[str, Any]:
    (found,) = target.find_by_identifier(rtype, f"{PF}{rtype.lower()}-id", sid)
    return found


def _ref_id(ref: dict[str, Any]) -> str:
    return str(ref["reference"]).split("/")[-1]


def _first_run(
    source: SourceSandbox, target: TargetSandbox, state: Path, extra: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], str, str]:
    """Patients and Encounters loaded (their Practitioners and Organizations fetched by reference);
    -> (an Encounter, its Practitioner's id, its Organization's id)."""
    encounters = _lines("Encounter")
    first = _load(source, target, state, _lines("Patient") + encounters + (extra or []), "first")
    assert first.quarantined == 0 and first.retry_queued == 0
    assert first.by_type["Practitioner"]["created"] > 1 and first.by_type["Organization"]["created"] > 1
    enc = encounters[0]
    return enc, _ref_id(enc["participant"][0]["individual"]), _ref_id(enc["serviceProvider"])


def test_a_run_refreshes_the_referenced_resources_its_resources_name(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    enc, pid, oid = _first_run(source, target, state)
    practitioner = next(p for p in _lines("Practitioner") if p["id"] == pid)
    organization = next(o for o in _lines("Organization") if o["id"] == oid)
    practitioner["name"][0]["family"] = "Renamed"
    organization["address"][0]["city"] = "Elsewhere"
    source.upsert(practitioner)
    source.upsert(organization)
    enc["status"] = "entered-in-error"
    source.upsert(enc)

    # Today's export holds only the changed Encounter; what it names is re-read, one `_id` search
    # per type, and the two changes land.
    source.stats.clear()
    writes = target.stats.writes
    second = _load(source, target, state, [enc], "second")
    assert second.quarantined == 0 and second.retry_queued == 0
    assert _stored(target, "Practitioner", pid)["name"][0]["family"] == "Renamed"
    assert _stored(target, "Organization", oid)["address"][0]["city"] == "Elsewhere"
    assert _stored(target, "Encounter", enc["id"])["status"] == "entered-in-error"
    assert second.by_type["Practitioner"]["updated"] == 1 and second.by_type["Organization"]["updated"] == 1
    assert source.stats.count("read") == 2
    assert target.stats.writes == writes + 3

    # Named again, unchanged at the source: re-read, skipped by hash, no write.
    enc["status"] = "finished"
    source.upsert(enc)
    source.stats.clear()
    writes = target.stats.writes
    third = _load(source, target, state, [enc], "third")
    assert third.by_type["Practitioner"]["unchanged"] == 1 and third.by_type["Organization"]["unchanged"] == 1
    assert source.stats.count("read") == 2
    assert target.stats.writes == writes + 1  # the Encounter only


def test_the_whole_set_is_re_read_when_the_last_pass_is_older_than_the_setting(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    # A Binary (outside the Patient compartment too) is never re-read: it is its content.
    binary = {"resourceType": "Binary", "id": "binary-1", "contentType": "text/plain", "data": "aGVsbG8="}
    enc, pid, _ = _first_run(source, target, state, [binary])
    loaded = len(target.resources("Practitioner")), len(target.resources("Organization"))
    other = next(
        p for p in _lines("Practitioner") if p["id"] != pid and target.find_by_identifier(
            "Practitioner", f"{PF}practitioner-id", p["id"])
    )  # fmt: skip
    other["name"][0]["family"] = "Unnamed-by-today"
    source.upsert(other)

    # The first run's pass is recent: only what the run names is re-read; `other` stays old.
    source.stats.clear()
    _load(source, target, state, [enc], "recent")
    assert source.stats.count("read") == 2
    assert _stored(target, "Practitioner", other["id"])["name"][0]["family"] != "Unnamed-by-today"

    # Due (0: every run): every known Practitioner and Organization is re-read, 50 ids a search;
    # only the changed one is written.
    source.stats.clear()
    writes = target.stats.writes
    due = _load(source, target, state, [enc], "due", after=0)
    assert _stored(target, "Practitioner", other["id"])["name"][0]["family"] == "Unnamed-by-today"
    assert due.by_type["Practitioner"]["updated"] == 1
    assert due.by_type["Practitioner"]["unchanged"] == loaded[0] - 1
    assert due.by_type["Organization"]["unchanged"] == loaded[1]
    assert source.stats.count("read") == -(-loaded[0] // 50) + -(-loaded[1] // 50)
    assert target.stats.writes == writes + 1


def test_plain_load_does_not_re_read_what_it_already_holds(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """`pfsync load` gives no refresh hint: a known target is not fetched again."""
    state = tmp_path / "state"
    enc, _, _ = _first_run(source, target, state)
    source.stats.clear()
    again = _load(source, target, state, [enc], "again", refresh=False)
    assert source.stats.count("read") == 0
    assert again.total("unchanged") == 1


def test_stateless_pods_re_read_the_whole_set_as_often_as_the_setting_says(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """State in Medplum, a new state directory every run: the time of the last whole-set pass is in
    the sync state, and the set itself is found in Medplum (the id map is empty)."""
    state = tmp_path / "state"
    env = sync_env(source, target, state, PFSYNC_STATE_BACKEND="medplum", PFSYNC_SINCE_OVERLAP="0")

    def sync(**extra: str) -> dict[str, Any]:
        shutil.rmtree(state, ignore_errors=True)
        result = CliRunner().invoke(app, ["sync", "--json"], env={**env, **extra})
        doc = summary(result.stdout)
        assert result.exit_code == 0, doc
        return dict(doc["sources"][0]["counts"])

    sync()
    store = MedplumStateStore(
        medplum_of(httpx.Client(auth=("pfsync-target", "target-secret")), fhir_url=target.fhir_url)
    )
    first_pass = store.load("pf").referenced_refreshed_at
    assert first_pass is not None
    held = [
        p
        for p in _lines("Practitioner")
        if target.find_by_identifier("Practitioner", f"{PF}practitioner-id", p["id"])
    ]
    changed = held[0]
    changed["name"][0]["family"] = "Changed-unnamed"
    source.upsert(changed)

    assert "Practitioner" not in sync()  # nothing names it and the pass is not due: not re-read
    assert _stored(target, "Practitioner", changed["id"])["name"][0]["family"] != "Changed-unnamed"
    assert store.load("pf").referenced_refreshed_at == first_pass

    counts = sync(PFSYNC_REFRESH_REFERENCED_AFTER="0")
    assert counts["Practitioner"]["updated"] == 1 and counts["Practitioner"]["unchanged"] == len(held) - 1
    assert _stored(target, "Practitioner", changed["id"])["name"][0]["family"] == "Changed-unnamed"
    assert store.load("pf").referenced_refreshed_at != first_pass
