"""`pfsync status` (CLI over a real state dir) and the Prometheus metrics file."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.instants import iso
from pfsync.sync.holders import Holder
from pfsync.sync.metrics import render, write_metrics
from pfsync.sync.state import LastRun, LocalStateStore, SyncState
from pfsync.sync.status import count_lines

runner = CliRunner()


def _env(tmp_path: Path) -> dict[str, str]:
    return {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PFSYNC_SOURCE_NAME": "a",
            "PFSYNC_STATE_DIR": str(tmp_path / "state")}  # fmt: skip


def _save(tmp_path: Path, **kw: object) -> LocalStateStore:
    store = LocalStateStore(tmp_path / "state")
    store.save(SyncState(source="a", **kw))  # type: ignore[arg-type]
    return store


def test_status_healthy_json(tmp_path: Path) -> None:
    now = time.time()
    _save(tmp_path, transaction_time="2026-01-01T00:00:00.000Z", last_attempt=iso(now - 60),
          last_success=iso(now - 30), last_outcome="ok",
          last_run=LastRun({"Patient": {"created": 5}}, 2.5, 700, 0))  # fmt: skip
    (tmp_path / "state" / "a" / "quarantine.ndjson").write_text('{"a":1}\n{"b":2}\n')
    (tmp_path / "state" / "a" / "retry.ndjson").write_text('{"a":1}')
    result = runner.invoke(app, ["status", "--json"], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    row = doc["sources"][0]
    assert doc["healthy"] is True
    assert (row["quarantineSize"], row["retryQueueSize"], row["lockHolder"]) == (2, 1, None)
    assert row["counts"] == {"Patient": {"created": 5}} and row["quotaUsed"] == 700
    assert 25 <= row["lastSuccessAgeSeconds"] < 3600


@pytest.mark.parametrize(
    ("state", "env", "reason"),
    [
        ({}, {}, "never ran"),
        ({"last_outcome": "failed", "last_error": "boom", "last_success": None}, {}, "last run failed: boom"),
        ({"last_outcome": "ok", "last_success": "2020-01-01T00:00:00.000Z"}, {}, "stale"),
        ({"last_outcome": "ok", "last_success": "NOW"}, {"PF_SYNC_ENABLED": "false"}, "sync is disabled"),
        (
            {"last_outcome": "ok", "last_success": "NOW"},
            {"PFSYNC_SOURCE_ENABLED": "false"},
            "source is disabled",
        ),
    ],
)
def test_status_unhealthy_exits_9(
    tmp_path: Path, state: dict[str, object], env: dict[str, str], reason: str
) -> None:
    if state.get("last_success") == "NOW":
        state["last_success"] = iso(time.time())
    _save(tmp_path, **state)
    result = runner.invoke(app, ["status", "--json"], env={**_env(tmp_path), **env})
    assert result.exit_code == 9, result.output
    assert reason in " ".join(orjson.loads(result.stdout)["sources"][0]["reasons"])


def test_status_table_names_lock_holder(tmp_path: Path) -> None:
    store = _save(tmp_path, last_outcome="ok", last_success=iso(time.time()))
    lock = store.acquire("a", Holder(777, "host-x", "2026-01-01T00:00:00.000Z"))
    try:
        result = runner.invoke(app, ["status"], env=_env(tmp_path))  # not a TTY, default width
    finally:
        lock.release()
    assert result.exit_code == 0, result.output
    # Not a TTY: one JSON object (README "Output"), every value whole (no 80-column wrapping).
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    row = orjson.loads(lines[0])["sources"][0]
    assert row["healthy"] is True
    assert row["lockHolder"] == "pid 777 on host-x since 2026-01-01T00:00:00.000Z"
    assert isinstance(row["lastSuccessAgeSeconds"], float) and row["lastSuccessAgeSeconds"].is_integer()


def test_status_corrupt_checkpoint_is_exit_7(tmp_path: Path) -> None:
    path = tmp_path / "state" / "a" / "checkpoint.json"
    path.parent.mkdir(parents=True)
    path.write_text("{oops")
    result = runner.invoke(app, ["status"], env=_env(tmp_path))
    assert result.exit_code == 7
    assert "corrupt" in result.output


def test_status_writes_metrics_file(tmp_path: Path) -> None:
    _save(tmp_path, last_outcome="ok", last_success="2026-01-01T00:00:00.000Z",
          last_run=LastRun({"Patient": {"created": 5, "quarantined": 1}}, 2.5, 700, 6),
          totals={"Patient": {"created": 12, "quarantined": 1}})  # fmt: skip
    prom = tmp_path / "textfile" / "pfsync.prom"
    result = runner.invoke(
        app, ["status", "--metrics", str(prom)], env={**_env(tmp_path), "PFSYNC_STALE_AFTER": "100000d"}
    )
    assert result.exit_code == 0, result.output
    text = prom.read_text()
    assert 'pfsync_last_success_timestamp_seconds{source="a"} 1767225600' in text
    # `_total` is a counter: the cumulative totals kept in the state; the last run is a gauge.
    assert "# TYPE pfsync_resources_total counter" in text
    assert 'pfsync_resources_total{source="a",type="Patient",outcome="created"} 12' in text
    assert 'pfsync_resources_total{source="a",type="Patient",outcome="quarantined"} 1' in text
    assert 'pfsync_last_run_resources{source="a",type="Patient",outcome="created"} 5' in text
    assert 'pfsync_run_duration_seconds{source="a"} 2.5' in text
    assert 'pfsync_quota_used{source="a"} 700' in text
    assert 'pfsync_healthy{source="a"} 1' in text
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644


def test_metrics_render_is_valid_exposition_format() -> None:
    text = render([])
    for line in text.splitlines():
        assert line.startswith(("# HELP pfsync_", "# TYPE pfsync_"))
    assert text.endswith("\n")


def test_metrics_escape_label_values(tmp_path: Path) -> None:
    from pfsync.sync.status import SourceStatus

    st = SourceStatus('we"ird\\name', True, True, (), None, None, None, None, None, None, None, None)
    write_metrics(tmp_path / "m.prom", [st])
    assert 'pfsync_healthy{source="we\\"ird\\\\name"} 1' in (tmp_path / "m.prom").read_text()


@pytest.mark.parametrize(("content", "n"), [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\nb\n", 2)])
def test_count_lines(tmp_path: Path, content: bytes, n: int) -> None:
    (tmp_path / "f").write_bytes(content)
    assert count_lines(tmp_path / "f") == n
    assert count_lines(tmp_path / "missing") == 0
