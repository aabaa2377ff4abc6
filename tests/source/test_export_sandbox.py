"""Integration tests: run_export over real HTTP against the source sandbox, every level, parameter and fault."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from doubles import ListSink
from test_export_fakes import FakeClock, SandboxAuth, lines_of

from pfsync.core.errors import ExportError, InterruptedRunError
from pfsync.core.redact import Secret
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import RetryPolicy
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.source.auth import source_auth
from pfsync.source.bulk import ExportRequest
from pfsync.source.export import ExportResult, LandedFile, run_export

pytestmark = pytest.mark.integration

TYPES = ("Patient", "Condition", "Encounter")
SMALL = {"Patient": 17, "Condition": 86, "Encounter": 431}  # fixtures/README.md synthea-small


def settings_of(sandbox: SourceSandbox, **kw: Any) -> SourceSettings:
    return SourceSettings(name="sandbox", base_url=sandbox.base_url(), client_id="pfsync-sandbox",
                          client_secret=Secret("sandbox-secret"), **kw)  # fmt: skip


def export(
    sandbox: SourceSandbox,
    out: Path,
    request: ExportRequest | None = None,
    *,
    auth: httpx.Auth | None = None,
    source: SourceSettings | None = None,
    settings: ExportSettings | None = None,
    **kw: Any,
) -> ExportResult:
    src = source or settings_of(sandbox)
    clock = FakeClock(start=time.time())
    with httpx.Client(timeout=30) as client:
        if auth is None:
            _, auth = source_auth(src, client, clock=clock)
        return run_export(src, settings or ExportSettings(), client, auth, out_dir=out,
                          request=request or ExportRequest(level="patient", types=TYPES), clock=clock,
                          policy=RetryPolicy(retries=4, base=0.01), **kw)  # fmt: skip


def lines_by_type(result: ExportResult) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in result.files:
        found[f.type] = found.get(f.type, 0) + f.lines
    return found


def test_export_patient_level_lands_every_resource(source: SourceSandbox, tmp_path: Path) -> None:
    sink = ListSink()
    result = export(source, tmp_path, events=sink)
    assert lines_by_type(result) == SMALL
    assert result.problems == () and result.warnings == () and result.deleted_on_server
    for f in result.files:
        assert all(r["resourceType"] == f.type for r in lines_of(f.path.read_bytes()))
    assert source.stats.count("delete") == 1
    assert {"kickoff", "status_complete", "download_request", "download_complete", "export_complete"} <= set(
        sink.names()
    )


def test_export_validate_modes_land_the_same_files(source: SourceSandbox, tmp_path: Path) -> None:
    landed = {}
    for mode in ("structure", "full"):
        result = export(source, tmp_path / mode, settings=ExportSettings(validate=mode))
        assert lines_by_type(result) == SMALL and result.problems == ()
        landed[mode] = {f.path.name: (f.sha256, f.lines) for f in result.files}
    assert landed["structure"] == landed["full"]


def test_export_group_level_exports_only_members(source: SourceSandbox, tmp_path: Path) -> None:
    result = export(
        source, tmp_path, ExportRequest(level="group", group_id="bulk-data-testing-group", types=TYPES)
    )
    assert lines_by_type(result)["Patient"] == 9  # docs/practice-fusion.md: the 9-patient testing group
    assert "/Group/bulk-data-testing-group/$export" in source.stats.requests("kickoff")[0].url


def test_export_system_level(source: SourceSandbox, tmp_path: Path) -> None:
    source.configure(system_export=True)
    result = export(source, tmp_path, ExportRequest(level="system", types=("Patient",)))
    assert lines_by_type(result) == {"Patient": 17}


@pytest.mark.parametrize("method", ["get", "post"])
def test_export_type_filter_and_method(source: SourceSandbox, tmp_path: Path, method: Any) -> None:
    req = ExportRequest(level="patient", types=("Encounter",), type_filters=("Encounter?status=finished",),
                        method=method)  # fmt: skip
    result = export(source, tmp_path, req)
    rows = [r for f in result.files for r in lines_of(f.path.read_bytes())]
    assert rows and all(r["status"] == "finished" for r in rows)
    assert source.stats.requests("kickoff")[0].method == method.upper()


def test_export_since_returns_changes_and_deletions(source: SourceSandbox, tmp_path: Path) -> None:
    first = export(source, tmp_path / "full")
    patient = lines_of((tmp_path / "full" / "Patient.1.ndjson").read_bytes())[0]
    source.upsert({**patient, "gender": "other"})
    source.delete("Condition", lines_of((tmp_path / "full" / "Condition.1.ndjson").read_bytes())[0]["id"])
    handed: list[LandedFile] = []
    req = ExportRequest(level="patient", types=TYPES, since=first.transaction_time)
    result = export(source, tmp_path / "incr", req, on_file=handed.append)
    assert lines_by_type(result) == {"Patient": 1}
    assert [(f.kind, f.path.name) for f in result.deleted_files] == [("deleted", "deleted.1.ndjson")]
    bundle = lines_of(result.deleted_files[0].path.read_bytes())[0]
    assert bundle["entry"][0]["request"]["method"] == "DELETE"
    assert "deleted" in {f.kind for f in handed}
    assert "_since=" in source.stats.requests("kickoff")[-1].url


@pytest.mark.parametrize("where", ["kickoff", "status", "download"])
@pytest.mark.parametrize("http_date", [False, True])
def test_export_rides_out_429_with_retry_after(
    source: SourceSandbox, tmp_path: Path, where: str, http_date: bool
) -> None:
    source.faults.rate_limit(where, times=2, retry_after=1, http_date=http_date)
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)))
    assert lines_by_type(result) == {"Patient": 17}
    assert sum(s.status == 429 for s in source.stats.requests()) == 2


@pytest.mark.parametrize("where", ["kickoff", "status", "download"])
@pytest.mark.parametrize("status", [500, 503])
def test_export_retries_server_errors(source: SourceSandbox, tmp_path: Path, where: str, status: int) -> None:
    # issue code "transient" (docs/bulk-data.md, recorded case 50)
    source.faults.server_error(where, times=1, status=status)
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)))
    assert lines_by_type(result) == {"Patient": 17}


def test_export_slow_export_reports_x_progress(source: SourceSandbox, tmp_path: Path) -> None:
    source.faults.slow_export(polls=3)
    sink = ListSink()
    export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)), events=sink)
    progress = [e["progress"] for e in sink.of("status_progress")]
    assert len(progress) >= 3 and all("complete" in p for p in progress[:3])


def test_export_resumes_file_after_connection_reset(source: SourceSandbox, tmp_path: Path) -> None:
    clean = export(source, tmp_path / "clean", ExportRequest(level="patient", types=("Encounter",)))
    source.faults.reset_download(after_bytes=100_000, type="Encounter")
    sink = ListSink()
    reset = export(
        source, tmp_path / "reset", ExportRequest(level="patient", types=("Encounter",)), events=sink
    )
    assert reset.files[0].path.read_bytes() == clean.files[0].path.read_bytes()
    assert reset.problems == ()
    assert sink.of("download_error")[0]["willRetry"]
    assert source.stats.count("download") == 3  # clean, reset mid-file, then the Range resume


@pytest.mark.parametrize("validate", ["structure", "full"])
@pytest.mark.parametrize("fault", ["truncate_download", "malformed_line"])
def test_export_downloads_damaged_file_again(
    source: SourceSandbox, tmp_path: Path, fault: str, validate: Any
) -> None:
    getattr(source.faults, fault)(type="Condition")
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Condition",)),
                    settings=ExportSettings(validate=validate))  # fmt: skip
    assert lines_by_type(result) == {"Condition": 86} and result.problems == ()


@pytest.mark.parametrize("validate", ["structure", "full"])
def test_export_persistent_malformed_line_is_reported_not_hidden(
    source: SourceSandbox, tmp_path: Path, validate: Any
) -> None:
    source.faults.malformed_line(times=None, type="Condition")
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Condition",)),
                    settings=ExportSettings(validate=validate))  # fmt: skip
    assert any("line 2 is not valid JSON" in p for p in result.problems)
    assert result.files[0].lines == 87  # the bad line is kept for the loader to quarantine


@pytest.mark.parametrize("bundle", [False, True])
def test_export_converts_pretty_json_file_to_ndjson(
    source: SourceSandbox, tmp_path: Path, bundle: bool
) -> None:
    # docs/practice-fusion.md: one pretty-printed resource (or a Bundle) served as application/json.
    source.faults.pretty_json(times=None, bundle=bundle, type="Patient")
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)))
    data = result.files[0].path.read_bytes()
    rows = lines_of(data)
    assert len(data.splitlines()) == len(rows) == (17 if bundle else 1)
    assert all(r["resourceType"] == "Patient" for r in rows)
    if bundle:
        assert result.problems == () and source.stats.count("download") == 1
    else:  # one resource where 17 were announced: fetched again, then reported as a count mismatch
        assert any("manifest announced 17" in p for p in result.problems)


def test_export_skips_unrequested_type_with_warning(source: SourceSandbox, tmp_path: Path) -> None:
    source.faults.unrequested_type(type="Location")
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)))
    assert any("Location" in w for w in result.warnings)
    assert not list(tmp_path.glob("Location*"))


def test_export_failed_export_reports_operation_outcome(source: SourceSandbox, tmp_path: Path) -> None:
    source.faults.export_fails(status=500)
    with pytest.raises(ExportError, match="simulated failure") as info:
        export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)))
    assert info.value.exit_code == 5
    assert orjson.loads((tmp_path / "job.json").read_bytes())["state"] == "kicked_off"  # resumable


def test_export_expired_saved_job_starts_new_export(source: SourceSandbox, tmp_path: Path) -> None:
    stop = threading.Event()

    class StopAtKickoff(ListSink):
        def emit(self, event: str, /, **detail: Any) -> None:
            super().emit(event, **detail)
            if event == "kickoff":
                stop.set()

    with pytest.raises(InterruptedRunError):
        export(
            source,
            tmp_path,
            ExportRequest(level="patient", types=("Patient",)),
            events=StopAtKickoff(),
            stop=stop,
        )
    old = orjson.loads((tmp_path / "job.json").read_bytes())["statusUrl"]
    source.faults.expired_status()
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)))
    assert result.status_url != old and lines_by_type(result) == {"Patient": 17}
    assert any("starting a new export" in w for w in result.warnings)
    assert source.stats.count("kickoff") == 2


def test_export_never_sends_token_to_foreign_origin(source: SourceSandbox, tmp_path: Path) -> None:
    source.faults.foreign_storage()
    # SandboxAuth adds the token to every request it sees: only run_export's own origin check protects it.
    auth = SandboxAuth(source.token_url())
    result = export(source, tmp_path, ExportRequest(level="patient", types=("Patient",)), auth=auth)
    assert lines_by_type(result) == {"Patient": 17}
    foreign = source.stats.requests("foreign")
    assert foreign and not any(s.authorization for s in foreign)
    assert "sig=" not in (tmp_path / "manifest.json").read_text()


def test_export_survives_token_expiry_mid_export(source: SourceSandbox, tmp_path: Path) -> None:
    source.faults.revoke_tokens_after_kickoff()
    src = settings_of(source)
    with httpx.Client() as client:
        _, auth = source_auth(src, client)
        result = run_export(src, ExportSettings(), client, auth, out_dir=tmp_path,
                            request=ExportRequest(level="patient", types=TYPES), clock=FakeClock(start=time.time()))  # fmt: skip
    assert lines_by_type(result) == SMALL
    assert source.stats.count("unauthorized") >= 1
    assert source.stats.count("token") >= 2  # renewed after the 401


def test_export_interrupted_mid_download_resumes_identically(source: SourceSandbox, tmp_path: Path) -> None:
    clean = export(source, tmp_path / "clean")
    stop = threading.Event()

    class StopAfterFirstFile(ListSink):
        def emit(self, event: str, /, **detail: Any) -> None:
            super().emit(event, **detail)
            if event == "download_complete":
                stop.set()

    out = tmp_path / "resumed"
    with pytest.raises(InterruptedRunError):
        export(source, out, events=StopAfterFirstFile(), stop=stop)
    job = orjson.loads((out / "job.json").read_bytes())
    assert job["state"] == "kicked_off"
    landed_before = {f["name"] for f in orjson.loads((out / "manifest.json").read_bytes())["files"]}
    sink = ListSink()
    resumed = export(source, out, events=sink)
    assert resumed.resumed and resumed.status_url == job["statusUrl"]
    fetched = {d["name"] for d in sink.of("download_request")}
    assert not (fetched & landed_before)  # complete files were not downloaded again
    for a, b in zip(clean.files, resumed.files, strict=True):
        assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()


def test_a_landed_file_whose_rename_a_crash_lost_is_downloaded_again(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """docs/export-decisions.md "Landing files durably": the directory is not fsynced per landed
    file, so a machine crash may lose a rename that manifest.journal already records. The resumed
    run must see that (size and sha256 of every recorded file) and download the file again."""
    keep = ExportSettings(delete_after_download=False)
    first = export(source, tmp_path / "out", settings=keep)
    job_file = tmp_path / "out" / "job.json"
    job = orjson.loads(job_file.read_bytes())
    job_file.write_bytes(orjson.dumps({**job, "state": "kicked_off"}))  # the crash came before "downloaded"
    by_name = {f.path.name: f.path.read_bytes() for f in first.files}
    lost, torn = sorted(by_name)[:2]
    (tmp_path / "out" / lost).rename(tmp_path / "out" / f".{lost}.part")  # the rename never reached the disk
    (tmp_path / "out" / torn).write_bytes(by_name[torn][:100])  # nor all of this file's data
    before = source.stats.count("download")
    again = export(source, tmp_path / "out", settings=keep)
    assert again.resumed and {f.path.name: f.path.read_bytes() for f in again.files} == by_name
    assert source.stats.count("download") - before == 2  # only those two, the others are intact
    assert not list((tmp_path / "out").glob(".*.part"))


def test_a_finished_export_whose_file_changed_is_exported_again_not_replayed(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """After a finished export (its job DELETEd on the server), one file loses its tail and another
    disappears before the next run replays them. Replaying would hand the loader less than was
    exported; the run notices (size and sha256), finds the job gone (404) and exports again."""
    first = export(source, tmp_path / "out")
    by_name = {f.path.name: f.path.read_bytes() for f in first.files}
    cut, gone = sorted(by_name)[:2]
    (tmp_path / "out" / cut).write_bytes(by_name[cut][:100])
    (tmp_path / "out" / gone).unlink()
    handed: list[LandedFile] = []
    again = export(source, tmp_path / "out", on_file=handed.append)
    assert again.status_url != first.status_url  # a new job: the old one was deleted after download
    assert lines_by_type(again) == SMALL
    assert {f.path.name: f.path.read_bytes() for f in again.files} == by_name
    assert sorted(f.path.name for f in handed) == sorted(by_name)
    assert any("no longer match" in w for w in again.warnings)
