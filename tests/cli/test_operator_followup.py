"""What an operator sees, the rest of issue 17: a token refused mid-run is a warning with its own
event, `status --json` durations read as milliseconds, a bad line is counted under its file's type
with file and line, and the load summary counts this run's logical references."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import httpx
import orjson
import pytest
from sync_helpers import TYPES, run, sync_env
from target_fixtures import TARGET_CLIENT, TARGET_SECRET
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.instants import iso
from pfsync.core.log import setup_logging
from pfsync.core.redact import Secret
from pfsync.core.settings import HttpSettings, MedplumSettings
from pfsync.medplum.auth import medplum_auth
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.sync.state import LastRun, LocalStateStore, SyncState

runner = CliRunner()


def _json_lines(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.integration
def test_a_token_refused_mid_run_is_a_warning_with_its_event(target: TargetSandbox) -> None:
    out = io.StringIO()
    setup_logging("json", 0, stream=out)
    settings = MedplumSettings(
        base_url=target.base_url, client_id=TARGET_CLIENT, client_secret=Secret(TARGET_SECRET)
    )
    with httpx.Client() as client:
        client.auth = medplum_auth(settings, client, http=HttpSettings(retries=1, retry_max_wait=1.0))
        assert client.get(target.fhir_url + "Patient", params={"_count": "1"}).status_code == 200
        httpx.post(target.base_url + "_sandbox/faults/expire-tokens")
        assert client.get(target.fhir_url + "Patient", params={"_count": "1"}).status_code == 200
    tokens = [line for line in _json_lines(out.getvalue()) if line["event"] == "auth_token"]
    assert [t["eventDetail"] for t in tokens] == [{"target": "medplum", "expiresIn": 3600}] * 2
    (retry,) = [line for line in _json_lines(out.getvalue()) if line["event"] == "auth_retry"]
    assert retry["level"] == "warning"
    assert retry["eventDetail"] == {"origin": target.base_url.rstrip("/"), "status": 401}


def test_status_json_duration_is_rounded_to_the_millisecond(tmp_path: Path) -> None:
    store = LocalStateStore(tmp_path / "state")
    now = time.time()
    store.save(SyncState(source="a", transaction_time="2026-01-01T00:00:00.000Z", last_attempt=iso(now),
                         last_success=iso(now), last_outcome="ok",
                         last_run=LastRun({"Patient": {"created": 5}}, 6.760974407196045, 700, 0)))  # fmt: skip
    env = {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PFSYNC_SOURCE_NAME": "a",
           "PFSYNC_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    result = runner.invoke(app, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    (row,) = orjson.loads(result.stdout)["sources"]
    assert row["durationSeconds"] == 6.761
    assert isinstance(row["lastSuccessAgeSeconds"], float) and row["lastSuccessAgeSeconds"].is_integer()


def test_a_toml_env_indirection_is_an_unknown_key(tmp_path: Path) -> None:
    """Secrets in TOML come as a value or `<name>_file`; there is no `<name>_env` form."""
    (tmp_path / "pfsync.toml").write_text('[medplum]\nclient_secret_env = "MY_SECRET"\n')
    result = runner.invoke(app, ["-c", str(tmp_path / "pfsync.toml"), "status"], env={"MY_SECRET": "s"})
    assert result.exit_code == 3, result.output
    assert "unknown key 'client_secret_env' in [medplum]" in result.output


def test_no_user_facing_text_speaks_of_a_seed_design() -> None:
    """Name the thing: the Medplum Practice Fusion bot integration (its environment names stay)."""
    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", *root.glob("docs/*.md"), *root.glob("pfsync/**/*.py")]
    pattern = re.compile(r"seed (design|integration|checkpoint)", re.IGNORECASE)
    found = [f"{p.relative_to(root)}:{n}" for p in files
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert not found, found


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "bad", "label"),
    [
        ("DiagnosticReport.1.ndjson", b'{"id": "x"}', "DiagnosticReport"),
        ("Patient.000.ndjson", b"{not json", "Patient"),
        ("mixed.ndjson", b'{"id": "x"}', "(no resourceType)"),
        ("mixed.ndjson", b"{not json", "(unreadable)"),
    ],
)
def test_a_bad_line_is_counted_under_its_files_type_with_file_and_line(
    target: TargetSandbox, tmp_path: Path, name: str, bad: bytes, label: str
) -> None:
    path = tmp_path / name
    good = b'{"resourceType": "Patient", "id": "p1"}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    env = {"MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_STATE_DIR": str(tmp_path / "s"),
           "PFSYNC_LOG_FORMAT": "json"}  # fmt: skip
    result = runner.invoke(app, ["load", str(path)], env=env)
    assert result.exit_code == 6, result.output
    assert orjson.loads(result.stdout)["byType"][label]["quarantined"] == 1
    (line,) = [x for x in _json_lines(result.stderr) if x["event"] == "load_quarantined"]
    assert line["level"] == "warning"
    detail = line["eventDetail"]
    assert isinstance(detail, dict)
    assert (detail["type"], detail["file"], detail["line"]) == (label, str(path), 2)
    assert target.count("Patient") == 1


@pytest.mark.integration
def test_the_load_summary_counts_this_runs_logical_references(target: TargetSandbox, tmp_path: Path) -> None:
    env = {"MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_STATE_DIR": str(tmp_path / "s"),
           "PFSYNC_LOG_FORMAT": "json"}  # fmt: skip

    def load(name: str, *resources: dict[str, object]) -> dict[str, object]:
        path = tmp_path / name
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
        result = runner.invoke(app, ["load", str(path)], env=env)
        assert result.exit_code == 0, result.output
        doc = orjson.loads(result.stdout)
        assert isinstance(doc, dict)
        return doc

    def obs(oid: str) -> dict[str, object]:
        return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "x"},
                "subject": {"reference": f"Patient/absent-{oid}"}}  # fmt: skip

    first = load("Observation.1.ndjson", obs("o1"), obs("o2"))
    assert (first["logicalReferences"], first["logicalReferencesHeld"]) == (2, 2)
    second = load("Observation.2.ndjson", obs("o3"))
    assert (second["logicalReferences"], second["logicalReferencesHeld"]) == (1, 3)
    third = load("Patient.ndjson", {"resourceType": "Patient", "id": "p1"})
    assert (third["logicalReferences"], third["logicalReferencesHeld"]) == (0, 3)
    fourth = load("Patient.2.ndjson", {"resourceType": "Patient", "id": "absent-o1"})
    assert (fourth["logicalReferences"], fourth["logicalReferencesHeld"]) == (0, 2)  # o1 upgraded


def _in_pty(cmd: list[str], env: dict[str, str], columns: int = 80, timeout: float = 120) -> tuple[int, str]:
    """Run `cmd` on a pseudo-terminal of `columns` columns; its exit code and everything it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"},
                            close_fds=True)  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.mark.integration
def test_an_80_column_terminal_shows_every_name_whole_and_no_info_lines(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    env = sync_env(source, target, tmp_path / "state", PF_RESOURCE_TYPES=f"{TYPES},MedicationRequest")
    del env["PFSYNC_LOG_FORMAT"]  # auto: human on a terminal
    seen = {}
    for args, code in ((["sync"], 0), (["status"], 0), (["verify"], 0)):
        got, output = _in_pty([sys.executable, "-m", "pfsync", *args], env)
        assert got == code, output[-3000:]
        seen[args[0]] = output
    assert "MedicationRequest" in seen["sync"] and "MedicationRequest" in seen["verify"]
    assert "pfsync status: pf" in seen["status"] and "last success" in seen["status"]
    for command, output in seen.items():
        assert "…" not in output, f"pfsync {command} cut a column:\n{output}"
        assert "INFO" not in output, f"pfsync {command} showed info lines on a terminal:\n{output}"


@pytest.mark.parametrize(
    ("entries", "size", "routed", "expected"),
    [
        (1, 2_000_000, False, True),
        (1, 1000, True, True),
        (1, 1000, False, False),
        (2, 2_000_000, True, False),
    ],
)
def test_only_a_single_oversize_resource_goes_async(
    entries: int, size: int, routed: bool, expected: bool
) -> None:
    from pfsync.medplum.asyncbatch import send_alone_async
    from pfsync.medplum.batch import Entry

    bundle = [
        Entry(type="Patient", sid=f"p{i}", method="POST", url="Patient", body=b"{}") for i in range(entries)
    ]
    keys = {("Patient", "p0")} if routed else set()
    assert send_alone_async(bundle, size, keys, 1_048_576) is expected


@pytest.mark.integration
def test_export_off_a_terminal_logs_the_source_token_with_json_values(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    env = sync_env(source, target, tmp_path / "state")
    result = runner.invoke(app, ["export", "--types", "Patient", "--out", str(tmp_path / "x")], env=env)
    assert result.exit_code == 0, result.output
    (token,) = [line for line in _json_lines(result.stderr) if line["event"] == "auth_token"]
    assert token["eventDetail"] == {"source": "pf", "expiresIn": 300, "grantedTypes": 1, "missing": []}


def test_quota_used_keeps_counting_once_a_quota_off_counter_reads_zero() -> None:
    from pfsync.net.pacing import Pacer

    pacer = Pacer()
    header = '"requests";r=59000;t=60, "fhirInteractions";r={r};t=60'
    pacer.observe(header.format(r=10_000), entries=100, searches=0, now=0.0, throttled=False)
    pacer.observe(header.format(r=0), entries=100, searches=0, now=1.0, throttled=False)  # ran out
    before = pacer.used
    for i in range(5):  # nothing refused: the quota is off, the counter stays at 0
        pacer.observe(header.format(r=0), entries=100, searches=0, now=2.0 + i, throttled=False)
    assert pacer.enforced is False
    assert pacer.used >= before + 5 * 100 * 50  # at least 50 points per write, not nothing


@pytest.mark.integration
def test_sync_lands_a_resource_too_large_for_a_synchronous_bundle(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    div = '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * 1_200_000 + "</div>"
    source.upsert({"resourceType": "Patient", "id": "big-one", "text": {"status": "generated", "div": div}})
    code, _out, err = run(sync_env(source, target, tmp_path / "state", PF_RESOURCE_TYPES="Patient"), "sync")
    assert code == 0, err[-2000:]
    assert target.count("AsyncJob") == 1
    assert any('"event":"load_async_batch"' in line and "big-one" in line for line in err.splitlines())
