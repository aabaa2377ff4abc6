"""Choosing the export to verify against, and the report's outcome and JSON."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pfsync.core.errors import UsageError
from pfsync.source.bulk import ExportRequest
from pfsync.source.exportjob import ExportDir, ExportJob
from pfsync.verify.exports import is_incremental, latest_export
from pfsync.verify.report import Finding, TypeCounts, VerifyReport


def make_export(path: Path, kicked_off: float, state: str = "complete", since: str | None = None) -> Path:
    d = ExportDir(path)
    d.save_manifest()
    request = ExportRequest(level="patient", types=("Patient",), since=since)
    d.save_job(ExportJob("https://ehr/status/1", request, "s", "https://ehr", kicked_off, state))  # type: ignore[arg-type]
    return path


def test_latest_export_picks_the_newest_finished_export(tmp_path: Path) -> None:
    root = tmp_path / "s" / "exports"
    make_export(root / "old", 100.0)
    newest = make_export(root / "new", 300.0)
    make_export(root / "running", 400.0, state="kicked_off")
    make_export(root / "failed", 500.0, state="failed")
    assert latest_export(tmp_path, "s") == [newest]


def test_latest_export_returns_every_request_of_a_sync_run(tmp_path: Path) -> None:
    run = tmp_path / "s" / "exports" / "run-20261125T000000-abc123"
    a = make_export(run / "fp-group-a", 200.0)
    b = make_export(run / "fp-group-b", 210.0)
    make_export(run / "members-g1", 220.0)  # sync's membership probe, not part of the export
    make_export(tmp_path / "s" / "exports" / "older", 100.0)
    assert latest_export(tmp_path, "s") == [a, b]


def test_latest_export_without_any_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no finished export"):
        latest_export(tmp_path, "s")


def test_is_incremental_reads_since_from_the_job(tmp_path: Path) -> None:
    assert is_incremental(make_export(tmp_path / "a", 1.0, since="2026-01-01T00:00:00Z"))
    assert not is_incremental(make_export(tmp_path / "b", 1.0))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not is_incremental(plain)


def report(**totals: int) -> VerifyReport:
    row = TypeCounts("Patient", source=3, medplum=3, present=3, **totals)
    return VerifyReport("s", "/x", (row,), (Finding("missing", "Patient", sid="p9"),), False, True, 40, 2, 0)


@pytest.mark.parametrize(
    ("totals", "ok"),
    [({}, True), ({"extra": 2}, True), ({"drift": 1}, True), ({"missing": 1}, False),
     ({"duplicated": 1}, False), ({"dangling": 1}, False)],
)  # fmt: skip
def test_report_ok_only_without_missing_duplicated_or_dangling(totals: dict[str, int], ok: bool) -> None:
    assert report(**totals).ok is ok


def test_report_json_lists_findings_by_category() -> None:
    doc = orjson.loads(orjson.dumps(report(missing=1).to_json()))
    assert doc["ok"] is False and doc["total"]["missing"] == 1 and doc["quotaUsed"] == 40
    assert doc["findings"]["missing"] == [{"type": "Patient", "sid": "p9"}]
    assert doc["findings"]["duplicated"] == [] and "actions" not in doc
