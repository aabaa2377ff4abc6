"""`pfsync export` end to end against the source sandbox, including kill -9 and resume in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from target_fixtures import TARGET_CLIENT, TARGET_SECRET
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.ndjson import iter_paths
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.source.exportjob import export_files

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def env_for(sandbox: SourceSandbox, types: str = "Patient,Condition,Encounter") -> dict[str, str]:
    return {"PF_FHIR_BASE_URL": sandbox.base_url(), "PF_CLIENT_ID": "pfsync-sandbox",
            "PF_CLIENT_SECRET": "sandbox-secret", "PF_RESOURCE_TYPES": types}  # fmt: skip


def cli(
    sandbox: SourceSandbox, monkeypatch: pytest.MonkeyPatch, *args: str, types: str = "Patient,Condition"
) -> tuple[int, str]:
    for key, value in env_for(sandbox, types).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["--log-format", "json", "export", *args])
    return result.exit_code, result.stdout


def test_cli_export_writes_directory_that_load_reads(
    source: SourceSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = cli(source, monkeypatch, "--out", str(tmp_path / "x"), "--json")
    assert code == 0, out
    summary = orjson.loads(out.strip().splitlines()[-1])
    assert summary["event"] == "export_summary"
    assert summary["exports"][0]["types"] == {"Condition": 86, "Patient": 17}
    names = [p.name for p in iter_paths([tmp_path / "x"])]
    assert names == ["Condition.1.ndjson", "Patient.1.ndjson"]  # job.json/manifest.json are skipped
    assert {"job.json", "manifest.json"} <= {p.name for p in (tmp_path / "x").iterdir()}


def test_cli_export_says_which_types_the_server_lacks_and_which_were_not_granted(
    source: SourceSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20: types dropped from the token request because the server does not have them were
    reported as "the token's scope does not grant ...", as if the practice had to authorise them."""
    source.configure(scope_types="data")  # like the reference server: no Medication, no ServiceRequest
    code, out = cli(source, monkeypatch, "--out", str(tmp_path / "x"), "--json",
                    types="Patient,Medication,Condition,ServiceRequest")  # fmt: skip
    assert code == 0, out
    warnings = orjson.loads(out.strip().splitlines()[-1])["exports"][0]["warnings"]
    assert any("server does not have Medication, ServiceRequest" in w for w in warnings), warnings
    assert not any("does not grant" in w for w in warnings), warnings


def test_cli_export_since_types_and_groups(
    source: SourceSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = cli(source, monkeypatch, "--out", str(tmp_path), "--since", "2000-01-01", "--types", "Patient",
                    "--group", "bulk-data-testing-group", "--group", "practice-patients-1")  # fmt: skip
    assert code == 0, out
    exports = orjson.loads(out.strip().splitlines()[-1])["exports"]
    assert [(Path(e["outDir"]).name, e["types"]) for e in exports] == [
        ("bulk-data-testing-group", {"Patient": 9}), ("practice-patients-1", {"Patient": 17})]  # fmt: skip
    kickoffs = [s.url for s in source.stats.requests("kickoff")]
    assert all("_since=2000-01-01T00%3A00%3A00Z" in u and "_type=Patient" in u for u in kickoffs)


@pytest.mark.parametrize(
    "args", [["--since", "2000-01-01", "--full"], ["--since", "yesterday"], ["--since", "2999-01-01"]]
)
def test_cli_export_rejects_bad_since(
    source: SourceSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    code, _ = cli(source, monkeypatch, "--out", str(tmp_path), *args)
    assert code == 2


def test_cli_export_failed_export_exits_5(
    source: SourceSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source.faults.export_fails()
    code, _ = cli(source, monkeypatch, "--out", str(tmp_path))
    assert code == 5


def test_cli_export_cancel_deletes_saved_job(
    source: SourceSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    from source_fixtures import kickoff_headers, source_token

    from pfsync.source.bulk import ExportRequest
    from pfsync.source.exportjob import ExportDir, ExportJob

    token = source_token(source)
    resp = httpx.get(source.base_url() + "/Patient/$export", headers=kickoff_headers(token))
    ExportDir(tmp_path).save_job(
        ExportJob(resp.headers["content-location"], ExportRequest(), "default", source.base_url(), 0.0)
    )
    code, out = cli(source, monkeypatch, "--out", str(tmp_path), "--cancel", "--json")
    assert code == 0 and orjson.loads(out)["cancelled"] == [str(tmp_path)]
    assert source.stats.count("delete") == 1


# ---- kill -9 and resume, in a real subprocess ---------------------------------------------------


def start_cli(sandbox: SourceSandbox, out: Path, **extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_"))}
    env.update(env_for(sandbox), PFSYNC_PARALLEL_DOWNLOADS="1", PFSYNC_LOG_FORMAT="json", **extra)
    return subprocess.Popen([sys.executable, "-m", "pfsync", "export", "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "condition never reached"
        time.sleep(0.01)


def landed(out: Path) -> list[str]:
    try:
        return [f["name"] for f in orjson.loads((out / "manifest.json").read_bytes())["files"]]
    except (FileNotFoundError, orjson.JSONDecodeError):
        return []


def run_to_end(sandbox: SourceSandbox, out: Path) -> subprocess.CompletedProcess[bytes]:
    proc = start_cli(sandbox, out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return subprocess.CompletedProcess(proc.args, 0, stdout, stderr)


@pytest.mark.parametrize("point", ["after-job-json", "after-first-file"])
def test_cli_export_resumes_after_kill_9(source: SourceSandbox, tmp_path: Path, point: str) -> None:
    out = tmp_path / "killed"
    if point == "after-job-json":
        source.faults.slow_export(polls=3)  # no Retry-After: the CLI backs off for seconds, job.json saved
        proc = start_cli(source, out)
        wait_until(lambda: (out / "job.json").exists(), proc)
    else:
        # Files come Patient, Condition, Encounter; Condition keeps breaking, so Patient has landed and
        # the CLI is inside its retry backoff (a .part may exist) when it dies.
        source.faults.reset_download(times=None, after_bytes=1000, type="Condition")
        proc = start_cli(source, out)
        wait_until(lambda: "Patient.1.ndjson" in landed(out), proc)
    status_url = orjson.loads((out / "job.json").read_bytes())["statusUrl"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)  # waits, and closes the pipes
    source.faults.clear()

    done = run_to_end(source, out)
    summary = orjson.loads(done.stdout.decode().strip().splitlines()[-1])["exports"][0]
    assert summary["resumed"] is True
    assert orjson.loads((out / "job.json").read_bytes())["statusUrl"] == status_url
    assert source.stats.count("kickoff") == 1  # the same job, not a new export
    if point == "after-first-file":
        downloads = [s.url for s in source.stats.requests("download") if s.status in (200, 206)]
        assert sum("/Patient/" in u for u in downloads) == 1  # landed before the kill: not fetched again

    clean = tmp_path / "clean"
    run_to_end(source, clean)
    files = sorted(p.name for p in iter_paths([out]))
    assert (
        files
        == sorted(p.name for p in iter_paths([clean]))
        == ["Condition.1.ndjson", "Encounter.1.ndjson", "Patient.1.ndjson"]
    )
    for name in files:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert not list(out.glob(".*"))  # no temp or partial files left behind


def test_cli_export_sigterm_stops_cleanly_and_resumes(source: SourceSandbox, tmp_path: Path) -> None:
    source.faults.slow_export(polls=4)
    proc = start_cli(source, tmp_path)
    wait_until(lambda: (tmp_path / "job.json").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert orjson.loads((tmp_path / "job.json").read_bytes())["state"] == "kicked_off"
    run_to_end(source, tmp_path)
    assert source.stats.count("kickoff") == 1


def test_cli_load_reads_every_group_directory_of_an_export(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `pfsync export` with several groups writes DIR/<group-id>/; `pfsync load DIR` must load both.
    out = tmp_path / "export"
    code, text = cli(source, monkeypatch, "--out", str(out), "--types", "Patient",
                     "--group", "bulk-data-testing-group", "--group", "practice-patients-1")  # fmt: skip
    assert code == 0, text
    assert {p.parent.name for p in iter_paths([out])} == {"bulk-data-testing-group", "practice-patients-1"}
    assert export_files(out).errors == () and export_files(out).deleted == ()
    # The testing group's patients are also practice patients: mark its file so its loading shows.
    with open(out / "bulk-data-testing-group" / "Patient.1.ndjson", "ab") as fh:
        fh.write(b'{"resourceType":"Patient","id":"only-in-the-group-directory"}\n')
    env = {"MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    result = CliRunner().invoke(app, ["--log-format", "json", "load", str(out), "--json"], env=env)
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert summary["byType"]["Patient"]["created"] == target.count("Patient") == 17 + 1
