"""What an operator sees (issue 17): failures at warning/error level with an `event` on every line,
an error:/hint: pair on every failure (even with -q, as JSON with JSON logs), and settings mistakes
(misspelt TOML keys, resource types, enum values, secret-file paths) stopped before any request."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from sync_helpers import run, sync_env
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.log import LOGGER_NAME, LogSink, setup_logging
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

runner = CliRunner()
# Nothing listens on port 9 (discard): a command that reached the network would fail with exit 75.
NOWHERE = {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PF_CLIENT_ID": "c", "PF_CLIENT_SECRET": "s",
           "MEDPLUM_BASE_URL": "http://127.0.0.1:9/", "MEDPLUM_CLIENT_ID": "m", "MEDPLUM_CLIENT_SECRET": "s",
           "PFSYNC_HTTP_RETRIES": "0", "PFSYNC_LOG_FORMAT": "human"}  # fmt: skip


def _json_lines(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---- levels and JSON lines ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "detail", "level"),
    [
        ("load_quarantined", {"type": "Patient", "reason": "bad"}, logging.WARNING),
        ("sync_locked", {"source": "a", "holder": "pid 1"}, logging.WARNING),
        ("sync_source_complete", {"source": "a", "outcome": "failed", "exitCode": 4}, logging.ERROR),
        ("sync_source_complete", {"source": "a", "outcome": "partial", "exitCode": 6}, logging.WARNING),
        ("sync_source_complete", {"source": "a", "outcome": "ok", "exitCode": 0}, logging.INFO),
        ("sync_summary", {"exitCode": 75}, logging.ERROR),
        ("download_error", {"name": "x"}, logging.WARNING),
        ("load_complete", {"created": 3, "quarantined": 0, "retry_queued": 2}, logging.WARNING),
        ("load_complete", {"created": 3, "quarantined": 0, "retry_queued": 0}, logging.INFO),
        ("export_complete", {"files": 3, "problems": 1}, logging.WARNING),
        ("verify_complete", {"ok": False}, logging.WARNING),
    ],
)
def test_failures_are_logged_at_warning_or_error(event: str, detail: dict[str, object], level: int) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("pfsync.test-levels")
    logger.addHandler(Keep())
    logger.setLevel(logging.DEBUG)
    LogSink(logger).emit(event, **detail)
    assert [r.levelno for r in records] == [level]


def test_json_log_lines_have_an_event_and_json_values() -> None:
    out = io.StringIO()
    logger = setup_logging("json", 0, stream=out)
    LogSink().emit("kickoff", exportId="e1", group=None, resumed=False, count=3)
    logger.info("auth_token target=medplum expires_in=%ds", 3600)
    logging.getLogger(f"{LOGGER_NAME}.download").warning("a line is too long")
    kickoff, token, warning = _json_lines(out.getvalue())
    assert kickoff["event"] == "kickoff" and kickoff["message"] == "kickoff"
    assert kickoff["eventDetail"] == {"exportId": "e1", "group": None, "resumed": False, "count": 3}
    assert token["event"] == "auth_token"
    assert warning["event"] == "download_warning" and warning["level"] == "warning"


def test_human_log_lines_show_values_in_json_terms_unwrapped() -> None:
    out = io.StringIO()
    setup_logging("human", 0, stream=out)
    LogSink().emit("kickoff", group=None, resumed=False, url="http://127.0.0.1/" + "x" * 200)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # not a terminal: never wrapped at 80 columns
    assert "group=null resumed=false" in lines[0] and "Python" not in lines[0]


# ---- every failure prints error:/hint:, even with -q ----------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["human", "json"])
def test_quiet_sync_with_a_wrong_medplum_secret_still_says_why(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, fmt: str
) -> None:
    env = sync_env(
        source, target, tmp_path / "state", MEDPLUM_CLIENT_SECRET="not-the-secret", PFSYNC_LOG_FORMAT=fmt
    )
    code, _out, err = run(env, "-q", "sync")
    assert code == 4, err
    if fmt == "human":
        assert "error: pf: " in err and "Invalid secret" in err
        assert "hint: wrong MEDPLUM_CLIENT_SECRET" in err
    else:
        lines = _json_lines(err)
        assert all("event" in line for line in lines)
        errors = [line for line in lines if line["event"] == "error"]
        assert len(errors) == 1 and errors[0]["exitCode"] == 4 and errors[0]["source"] == "pf"
        assert "MEDPLUM_CLIENT_SECRET" in str(errors[0]["hint"])
        assert any(line["level"] == "error" and line["event"] == "sync_source_complete" for line in lines)


def test_error_lines_are_json_with_json_logs(tmp_path: Path) -> None:
    env = {**os.environ, **NOWHERE, "PFSYNC_LOG_FORMAT": "json", "PFSYNC_STATE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pfsync", "-q", "export", "--types", "Patiant", "--out",
                          str(tmp_path / "x")], env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    (line,) = _json_lines(out.stderr)
    assert line["event"] == "error" and line["level"] == "error" and line["exitCode"] == 2
    assert "did you mean Patient?" in str(line["message"])


# ---- settings mistakes: exit 2 or 3 before any request --------------------------------------------


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[http]\ntimout = 5\n", "unknown key 'timout' in [http] (did you mean 'timeout'?)"),
        ('[medplum]\nclient_secert_file = "x"\n', "(did you mean 'client_secret_file'?)"),
        ('[[sources]]\nname = "a"\nbase_url = "http://127.0.0.1:9/"\nclinet_id = "x"\n',
         "unknown key 'clinet_id' in [sources[0]] (did you mean 'client_id'?)"),
        ("[htp]\ntimeout = 5\n", "unknown table(s) htp (did you mean http?)"),
    ],
)  # fmt: skip
def test_misspelt_toml_keys_are_configuration_errors(tmp_path: Path, toml: str, fragment: str) -> None:
    (tmp_path / "pfsync.toml").write_text(toml)
    result = runner.invoke(app, ["-c", str(tmp_path / "pfsync.toml"), "status"], env=NOWHERE)
    assert result.exit_code == 3, result.output
    assert fragment in result.output


@pytest.mark.parametrize(
    ("args", "env", "code", "fragment"),
    [
        (["export", "--types", "Patiant,Condition"], {}, 2, "--types: 'Patiant' is not a FHIR resource type"),
        (["export"], {"PF_RESOURCE_TYPES": "Patient,Condtion"}, 3, "PF_RESOURCE_TYPES: 'Condtion'"),
        (["--log-format", "jsn", "export"], {}, 2, "--log-format must be one of auto, human, json; got 'jsn'"),
        (["export"], {"PFSYNC_LOG_FORMAT": "xml"}, 3, "PFSYNC_LOG_FORMAT must be one of"),
        (["export", "--level", "grup"], {}, 2, "(did you mean group?)"),
        (["export"], {"PF_CLIENT_SECRET": "/no/such/dir/secret"}, 3, "secret file /no/such/dir/secret does not exist"),
        (["export"], {"PF_CLIENT_SECRET": "./nosuch-secret"}, 3, "does not exist"),
        (["export"], {"MEDPLUM_CLIENT_SECRET": "/"}, 3, "MEDPLUM_CLIENT_SECRET: secret file / is a directory"),
    ],
)  # fmt: skip
def test_bad_settings_stop_before_any_request(
    tmp_path: Path, args: list[str], env: dict[str, str], code: int, fragment: str
) -> None:
    env = {**NOWHERE, "PFSYNC_STATE_DIR": str(tmp_path), **env}
    if env["PFSYNC_LOG_FORMAT"] == "human" and "--log-format" not in args:
        args = ["--log-format", "human", *args]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x")], env=env)
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_a_secret_that_is_not_path_like_is_used_as_it_is(tmp_path: Path) -> None:
    from pfsync.core.settings import load_settings

    settings = load_settings(env={**NOWHERE, "PF_CLIENT_SECRET": "a/b+c=="}, cwd=tmp_path)
    secret = settings.source().client_secret
    assert secret is not None and secret.reveal() == "a/b+c=="


def test_retries_against_an_unreachable_port_are_logged_while_waiting(tmp_path: Path) -> None:
    env = {**os.environ, **NOWHERE, "PFSYNC_LOG_FORMAT": "json", "PFSYNC_HTTP_RETRIES": "2",
           "PFSYNC_RETRY_MAX_WAIT": "0.05", "PFSYNC_STATE_DIR": str(tmp_path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "pfsync", "sync"], env=env, capture_output=True, text=True)
    assert out.returncode == 75
    lines = _json_lines(out.stderr)
    retries = [line for line in lines if line["event"] == "http_retry"]
    assert len(retries) == 2 and all(line["level"] == "warning" for line in retries)
    assert "retry 1 of 2" in str(retries[0]["message"])
    (error,) = [line for line in lines if line["event"] == "error"]
    assert error["exitCode"] == 75 and "unreachable" in str(error["hint"])


# ---- status ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "since", "text"),
    [
        ("full", None, "full export in exports/run-1, started 2026-12-05T07:10:22Z"),
        ("incremental", "2026-12-04T00:00:00Z",
         "incremental export of changes since 2026-12-04T00:00:00Z in exports/run-1, started 2026-12-05T07:10:22Z"),
    ],
)  # fmt: skip
def test_status_in_flight_reads_without_contradiction(
    tmp_path: Path, kind: str, since: str | None, text: str
) -> None:
    from pfsync.sync.state import InFlight, LocalStateStore, SyncState

    store = LocalStateStore(tmp_path / "state")
    store.save(
        SyncState(source="a", in_flight=InFlight(kind, "exports/run-1", since, "2026-12-05T07:10:22Z"))
    )
    env = {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PFSYNC_SOURCE_NAME": "a"}
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path / "state")], env=env)
    row = orjson.loads(result.stdout)["sources"][0]
    assert row["inFlight"] == text


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_command_line_mistakes_are_one_error_and_hint_too(fmt: str) -> None:
    env = {**os.environ, "PFSYNC_LOG_FORMAT": fmt}
    out = subprocess.run([sys.executable, "-m", "pfsync", "sync", "--no-such-flag"], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2
    if fmt == "human":
        error, hint = out.stderr.splitlines()
        assert error == "error: No such option: --no-such-flag"
        assert hint.startswith("hint: see `") and hint.endswith(
            "pfsync sync --help`"
        )  # python -m pfsync here
    else:
        (line,) = _json_lines(out.stderr)
        assert line["event"] == "error" and line["exitCode"] == 2 and "--no-such-flag" in str(line["message"])


def test_export_requests_log_each_retry_as_a_warning() -> None:
    import httpx
    from test_auth_support import FakeClock

    from pfsync.net.http import RetryPolicy
    from pfsync.source.bulk import send

    answers: Iterator[Exception | httpx.Response] = iter(
        [httpx.ConnectError("refused"), httpx.Response(503), httpx.Response(200)]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("pfsync.http")  # export requests retry through the one request path
    keep = Keep()
    logger.addHandler(keep)
    try:
        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            request = client.build_request("GET", "http://127.0.0.1:9/fhir/Patient/$export")
            response = send(client, request, None, policy=RetryPolicy(retries=3, max_wait=0.1), clock=FakeClock(),
                             stop=None)  # fmt: skip
    finally:
        logger.removeHandler(keep)
    assert response.status_code == 200
    retries = [r for r in records if getattr(r, "event", None) == "http_retry"]
    assert [r.levelno for r in retries] == [logging.WARNING, logging.WARNING]
    assert "ConnectError" in retries[0].getMessage() and "503" in retries[1].getMessage()


def test_sigterm_while_the_stop_event_is_locked_does_not_deadlock() -> None:
    """`sync --every` sits in stop.wait(), which holds the Event's own lock at moments: a handler
    that set the Event right there deadlocked (seen as a 30 s hang after SIGTERM)."""
    import signal
    import threading

    from pfsync.sync.schedule import stop_on_signals

    stop = threading.Event()
    with stop_on_signals(stop):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)

        def signal_arrives_inside_wait() -> None:
            with stop._cond:  # type: ignore[attr-defined]  # as inside Event.wait()
                handler(signal.SIGTERM, None)

        worker = threading.Thread(target=signal_arrives_inside_wait, daemon=True)
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "the signal handler deadlocked on the stop event's lock"
        assert stop.wait(5)
