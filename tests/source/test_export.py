"""Unit tests of run_export's orchestration and resume logic over pytest-httpx (fake clock)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from doubles import ListSink
from pytest_httpx import HTTPXMock
from test_export_fakes import FakeClock

from pfsync.core.errors import AuthError, ExportError, InterruptedRunError, UsageError
from pfsync.core.ndjson import iter_paths
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.source.bulk import ExportRequest
from pfsync.source.export import ExportResult, LandedFile, cancel_export, run_export
from pfsync.source.exportjob import ExportDir, export_files

BASE = "https://ehr.example/fhir/r4/v1/practice"
KICKOFF = f"{BASE}/Patient/$export"
STATUS = f"{BASE}/Export/job-1"
SOURCE = SourceSettings(name="pf", base_url=BASE)
REQUEST = ExportRequest(level="patient", types=("Patient", "Condition"))


def ndjson(rtype: str, n: int) -> bytes:
    return b"".join(orjson.dumps({"resourceType": rtype, "id": f"{rtype[0]}{i}"}) + b"\n" for i in range(n))


FILES = {f"{BASE}/Binary/p1": ndjson("Patient", 3), f"{BASE}/Binary/c1": ndjson("Condition", 2),
         f"{BASE}/Binary/c2": ndjson("Condition", 4)}  # fmt: skip


def manifest(**extra: Any) -> dict[str, Any]:
    return {
        "transactionTime": "2026-02-03T04:05:06Z", "request": KICKOFF, "requiresAccessToken": True,
        "output": [{"type": "Patient", "url": f"{BASE}/Binary/p1", "count": 3},
                   {"type": "Condition", "url": f"{BASE}/Binary/c1", "count": 2},
                   {"type": "Condition", "url": f"{BASE}/Binary/c2", "count": 4}],
        "error": [], **extra,
    }  # fmt: skip


def serve(httpx_mock: HTTPXMock, *, kickoff: bool = True, body: dict[str, Any] | None = None,
          delete: bool = True, files: dict[str, bytes] | None = None) -> None:  # fmt: skip
    if kickoff:
        httpx_mock.add_response(method="GET", url=httpx.URL(KICKOFF, params={"_outputFormat": "application/fhir+ndjson",
                                "_type": "Patient,Condition"}), status_code=202, headers={"Content-Location": STATUS})  # fmt: skip
    httpx_mock.add_response(method="GET", url=STATUS, json=body or manifest())
    for url, data in (files if files is not None else FILES).items():
        httpx_mock.add_response(method="GET", url=url, content=data)
    if delete:
        httpx_mock.add_response(method="DELETE", url=STATUS, status_code=202)


def export(tmp_path: Path, request: ExportRequest = REQUEST, **kw: Any) -> ExportResult:
    with httpx.Client() as client:
        return run_export(SOURCE, kw.pop("settings", ExportSettings()), client, None, out_dir=tmp_path,
                          request=request, clock=FakeClock(), **kw)  # fmt: skip


def test_run_export_lands_named_files_and_manifest(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    serve(httpx_mock)
    seen: list[tuple[str, str]] = []
    sink = ListSink()
    result = export(
        tmp_path, events=sink, on_file=lambda f: seen.append((f.path.name, threading.current_thread().name))
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "Condition.1.ndjson",
        "Condition.2.ndjson",
        "Patient.1.ndjson",
        "job.json",
        "manifest.json",
    ]
    assert [f.path.name for f in result.files] == [
        "Condition.1.ndjson",
        "Condition.2.ndjson",
        "Patient.1.ndjson",
    ]
    assert (
        result.transaction_time == "2026-02-03T04:05:06Z" and result.lines == 9 and result.deleted_on_server
    )
    assert {t for _, t in seen} == {threading.current_thread().name}  # on_file runs on the caller's thread
    local = orjson.loads((tmp_path / "manifest.json").read_bytes())
    assert {f["name"]: f["lines"] for f in local["files"]} == {"Patient.1.ndjson": 3, "Condition.1.ndjson": 2,
                                                               "Condition.2.ndjson": 4}  # fmt: skip
    assert orjson.loads((tmp_path / "job.json").read_bytes())["state"] == "complete"
    assert sink.names()[0] == "kickoff" and sink.names()[-1] == "export_complete"
    assert all(d["exportId"] == "job-1" for _, d in sink.events)


def test_run_export_saves_job_before_first_poll(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    saved: list[dict[str, Any]] = []

    def status(request: httpx.Request) -> httpx.Response:
        saved.append(orjson.loads((tmp_path / "job.json").read_bytes()))
        return httpx.Response(200, json=manifest())

    httpx_mock.add_response(
        method="GET", status_code=202, headers={"Content-Location": STATUS}, url=re.compile(r".*\$export.*")
    )
    httpx_mock.add_callback(status, method="GET", url=STATUS)
    for url, data in FILES.items():
        httpx_mock.add_response(method="GET", url=url, content=data)
    httpx_mock.add_response(method="DELETE", url=STATUS, status_code=202)
    export(tmp_path)
    assert saved[0]["statusUrl"] == STATUS and saved[0]["state"] == "kicked_off"


def test_run_export_resumes_saved_job_without_new_kickoff(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    serve(httpx_mock, delete=False)
    httpx_mock.add_response(method="GET", url=STATUS, json=manifest())
    httpx_mock.add_response(method="DELETE", url=STATUS, status_code=202)
    first = export(tmp_path, settings=ExportSettings(delete_after_download=False))
    # A crash after landing but before "downloaded" was recorded: the next run polls the same job.
    d = ExportDir(tmp_path)
    d.set_state(d.load_job(), "kicked_off")  # type: ignore[arg-type]
    (tmp_path / "Condition.2.ndjson").write_bytes(b"tampered\n")  # fails its sha256: downloaded again
    httpx_mock.add_response(method="GET", url=f"{BASE}/Binary/c2", content=FILES[f"{BASE}/Binary/c2"])
    handed: list[str] = []
    second = export(tmp_path, on_file=lambda f: handed.append(f.path.name))
    assert second.resumed and second.status_url == first.status_url
    assert sorted(handed) == ["Condition.1.ndjson", "Condition.2.ndjson", "Patient.1.ndjson"]
    kickoffs = [r for r in httpx_mock.get_requests() if "$export" in str(r.url)]
    downloads = [str(r.url) for r in httpx_mock.get_requests() if "/Binary/" in str(r.url)]
    assert len(kickoffs) == 1 and len(downloads) == 4  # three first, then only the tampered one
    assert (tmp_path / "Condition.2.ndjson").read_bytes() == FILES[f"{BASE}/Binary/c2"]


def test_run_export_after_complete_replays_files_without_network(
    httpx_mock: HTTPXMock, tmp_path: Path
) -> None:
    serve(httpx_mock)
    export(tmp_path)
    handed: list[LandedFile] = []
    again = export(tmp_path, on_file=handed.append)
    assert again.resumed and len(handed) == 3 and again.lines == 9
    assert len(httpx_mock.get_requests()) == 6  # kick-off, poll, 3 files, DELETE: nothing new


def test_run_export_after_complete_collects_again_when_a_landed_file_changed(
    httpx_mock: HTTPXMock, tmp_path: Path
) -> None:
    """A finished job is replayed only from files that still match their size and sha256: a file
    cut short after the export (by anything but pfsync) would hand the loader less than was exported,
    and a sync would then move its checkpoint past what it never loaded. The job, still on the
    server, is collected again: the changed file is downloaded, the others are not."""
    serve(httpx_mock, delete=False)
    export(tmp_path, settings=ExportSettings(delete_after_download=False))
    (tmp_path / "Condition.2.ndjson").write_bytes(FILES[f"{BASE}/Binary/c2"][:20])
    httpx_mock.add_response(method="GET", url=STATUS, json=manifest())
    httpx_mock.add_response(method="GET", url=f"{BASE}/Binary/c2", content=FILES[f"{BASE}/Binary/c2"])
    handed: list[str] = []
    again = export(tmp_path, on_file=lambda f: handed.append(f.path.name),
                   settings=ExportSettings(delete_after_download=False))  # fmt: skip
    assert sorted(handed) == ["Condition.1.ndjson", "Condition.2.ndjson", "Patient.1.ndjson"]
    assert (tmp_path / "Condition.2.ndjson").read_bytes() == FILES[f"{BASE}/Binary/c2"]
    assert again.lines == 9 and any("Condition.2.ndjson no longer match" in w for w in again.warnings)
    downloads = [str(r.url) for r in httpx_mock.get_requests() if "/Binary/" in str(r.url)]
    assert downloads.count(f"{BASE}/Binary/c2") == 2 and len(downloads) == 4


def test_run_export_starts_over_when_saved_job_expired(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    d = ExportDir(tmp_path)
    from pfsync.source.exportjob import ExportJob

    d.save_job(ExportJob(f"{BASE}/Export/old", REQUEST, "pf", BASE, 0.0))
    httpx_mock.add_response(method="GET", url=f"{BASE}/Export/old", status_code=404, json={"resourceType": "OperationOutcome", "issue": []})  # fmt: skip
    serve(httpx_mock)
    result = export(tmp_path)
    assert result.status_url == STATUS
    assert [r.method for r in httpx_mock.get_requests()][:3] == [
        "GET",
        "GET",
        "GET",
    ]  # old poll, kick-off, poll
    assert any("starting a new export" in w for w in result.warnings)


@pytest.mark.parametrize("strict", [False, True])
def test_run_export_skips_or_refuses_types_not_granted(
    httpx_mock: HTTPXMock, tmp_path: Path, strict: bool
) -> None:
    if strict:
        with pytest.raises(AuthError, match="Condition"):
            export(tmp_path, granted_types=["Patient"], settings=ExportSettings(strict_scopes=True))
        assert not (tmp_path / "job.json").exists()
        return
    httpx_mock.add_response(method="GET", status_code=202, headers={"Content-Location": STATUS},
                            url=httpx.URL(KICKOFF, params={"_outputFormat": "application/fhir+ndjson", "_type": "Patient"}))  # fmt: skip
    body = manifest(output=[{"type": "Patient", "url": f"{BASE}/Binary/p1", "count": 3}])
    serve(httpx_mock, kickoff=False, body=body, files={f"{BASE}/Binary/p1": FILES[f"{BASE}/Binary/p1"]})
    result = export(tmp_path, granted_types=["Patient", "Observation"])
    assert any("does not grant Condition" in w for w in result.warnings)


def test_run_export_fails_on_fatal_error_file_and_reports_warnings(
    httpx_mock: HTTPXMock, tmp_path: Path
) -> None:
    def oo(sev: str, text: str) -> bytes:
        return orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": sev, "code": "processing",
                                                                             "diagnostics": text}]}) + b"\n"  # fmt: skip

    body = manifest(error=[{"type": "OperationOutcome", "url": f"{BASE}/Binary/e1"}])
    serve(httpx_mock, body=body, files={**FILES, f"{BASE}/Binary/e1": oo("warning", "slow disk") + oo("error", "Condition file failed")})  # fmt: skip
    with pytest.raises(ExportError, match="Condition file failed") as info:
        export(tmp_path)
    assert info.value.exit_code == 5
    assert orjson.loads((tmp_path / "job.json").read_bytes())["state"] == "failed"
    assert (tmp_path / "error.1.ndjson").is_file()


def test_run_export_warning_issues_do_not_fail(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    warn = orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational", "diagnostics": "FYI"}]})  # fmt: skip
    body = manifest(error=[{"type": "OperationOutcome", "url": f"{BASE}/Binary/e1"}])
    serve(httpx_mock, body=body, files={**FILES, f"{BASE}/Binary/e1": warn})
    handed: list[str] = []
    result = export(tmp_path, on_file=lambda f: handed.append(f.kind))
    assert [i.text for i in result.issues] == ["FYI"] and len(result.errors) == 1
    assert "error" not in handed


def test_run_export_follows_next_links_and_skips_unrequested_types(
    httpx_mock: HTTPXMock, tmp_path: Path
) -> None:
    page1 = manifest(output=[{"type": "Patient", "url": f"{BASE}/Binary/p1"}, {"type": "Location", "url": f"{BASE}/Binary/l1"}],
                     link=[{"relation": "next", "url": f"{STATUS}?page=2"}])  # fmt: skip
    page2 = manifest(output=[{"type": "Condition", "url": f"{BASE}/Binary/c1"}],
                     deleted=[{"type": "Bundle", "url": f"{BASE}/Binary/d1"}])  # fmt: skip
    deleted = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "DELETE", "url": "Patient/x"}}]}) + b"\n"  # fmt: skip
    serve(httpx_mock, body=page1, files={f"{BASE}/Binary/p1": FILES[f"{BASE}/Binary/p1"]})
    httpx_mock.add_response(method="GET", url=f"{STATUS}?page=2", json=page2)
    httpx_mock.add_response(method="GET", url=f"{BASE}/Binary/c1", content=FILES[f"{BASE}/Binary/c1"])
    httpx_mock.add_response(method="GET", url=f"{BASE}/Binary/d1", content=deleted)
    kinds: list[tuple[str, str]] = []
    result = export(tmp_path, on_file=lambda f: kinds.append((f.kind, f.path.name)))
    assert sorted(kinds) == [
        ("deleted", "deleted.1.ndjson"),
        ("output", "Condition.1.ndjson"),
        ("output", "Patient.1.ndjson"),
    ]
    assert any("Location, which was not requested" in w for w in result.warnings)
    assert not (tmp_path / "Location.1.ndjson").exists()
    assert [f.path.name for f in result.deleted_files] == ["deleted.1.ndjson"]


def test_run_export_refuses_other_request_in_same_dir(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    from pfsync.source.exportjob import ExportJob

    ExportDir(tmp_path).save_job(ExportJob(STATUS, ExportRequest(level="patient"), "pf", BASE, 0.0))
    with pytest.raises(UsageError, match="another export in progress"):
        export(tmp_path)


def test_run_export_interrupted_keeps_job_resumable(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    stop = threading.Event()
    httpx_mock.add_response(
        method="GET", status_code=202, headers={"Content-Location": STATUS}, url=re.compile(r".*\$export.*")
    )

    def status(request: httpx.Request) -> httpx.Response:
        stop.set()  # SIGTERM arrives while the server is still working
        return httpx.Response(202, headers={"Retry-After": "5"})

    httpx_mock.add_callback(status, method="GET", url=STATUS)
    with pytest.raises(InterruptedRunError):
        export(tmp_path, stop=stop)
    assert orjson.loads((tmp_path / "job.json").read_bytes())["state"] == "kicked_off"


def test_cancel_export_deletes_saved_job(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    from pfsync.source.exportjob import ExportJob

    ExportDir(tmp_path).save_job(ExportJob(STATUS, REQUEST, "pf", BASE, 0.0))
    httpx_mock.add_response(method="DELETE", url=STATUS, status_code=202)
    with httpx.Client() as client:
        assert cancel_export(tmp_path, client, None, clock=FakeClock()) is True
        assert cancel_export(tmp_path, client, None, clock=FakeClock()) is False
    assert orjson.loads((tmp_path / "job.json").read_bytes())["state"] == "cancelled"


# ---- what `pfsync load DIR` finds in an export directory ------------------------------------------

_TREE = [
    "Patient.1.ndjson", "error.1.ndjson", "deleted.1.ndjson", "manifest.json", "job.json",
    ".Patient.2.ndjson.part", ".manifest.json.12.34.tmp", "notes.txt", "pretty.json",
    "g1/Condition.1.ndjson", "g1/Patient.1.ndjson", "g1/Patient.2.ndjson.gz", "g1/error.1.ndjson",
    "g1/deleted.2.ndjson", "g1/manifest.json", "g1/job.json", "g1/.Condition.2.ndjson.part",
    "g2/nested/Encounter.1.ndjson", ".hidden/Patient.1.ndjson",
]  # fmt: skip


def make_tree(root: Path) -> Path:
    for name in _TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b'{"resourceType":"Patient","id":"x"}\n')
    return root


def test_iter_paths_recurses_into_group_dirs_and_yields_only_loadable_output(tmp_path: Path) -> None:
    found = [p.relative_to(tmp_path).as_posix() for p in iter_paths([make_tree(tmp_path)])]
    assert found == ["Patient.1.ndjson", "pretty.json", "g1/Condition.1.ndjson", "g1/Patient.1.ndjson",
                     "g1/Patient.2.ndjson.gz", "g2/nested/Encounter.1.ndjson"]  # fmt: skip


def test_iter_paths_yields_a_file_named_explicitly(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert list(iter_paths([tmp_path / "g1" / "error.1.ndjson"])) == [tmp_path / "g1" / "error.1.ndjson"]


def test_export_files_classifies_output_deleted_and_error_files(tmp_path: Path) -> None:
    files = export_files(make_tree(tmp_path))

    def rel(paths: tuple[Path, ...]) -> list[str]:
        return [p.relative_to(tmp_path).as_posix() for p in paths]

    assert rel(files.output) == [p.relative_to(tmp_path).as_posix() for p in iter_paths([tmp_path])]
    assert rel(files.deleted) == ["deleted.1.ndjson", "g1/deleted.2.ndjson"]
    assert rel(files.errors) == ["error.1.ndjson", "g1/error.1.ndjson"]
