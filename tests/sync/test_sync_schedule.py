"""`--every` loop and signal handling: unit tests of run_every, and the real CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from pfsync.core.errors import ExitCode
from pfsync.sync.holders import Holder
from pfsync.sync.lock import FileLock
from pfsync.sync.schedule import run_every, stop_on_signals


def test_run_every_runs_until_stopped_and_survives_failures() -> None:
    stop, calls = threading.Event(), []

    def once() -> int:
        calls.append(1)
        if len(calls) == 3:
            stop.set()
        return 75 if len(calls) == 1 else 0  # a failed run does not end the loop

    assert run_every(once, 0.001, run_on_startup=True, stop=stop) == 0
    assert len(calls) == 3


def test_run_every_without_startup_waits_first() -> None:
    stop = threading.Event()
    calls: list[int] = []
    stop.set()

    def tick() -> int:
        calls.append(1)
        return 0

    assert run_every(tick, 0.001, run_on_startup=False, stop=stop) == 0
    assert calls == []


def test_run_every_interrupted_run_is_130() -> None:
    stop = threading.Event()

    def once() -> int:
        stop.set()
        return int(ExitCode.INTERRUPTED)

    assert run_every(once, 60, run_on_startup=True, stop=stop) == 130


def test_stop_on_signals_sets_event_then_restores() -> None:
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
        with pytest.raises(KeyboardInterrupt):  # a second signal stops waiting
            os.kill(os.getpid(), signal.SIGTERM)
            stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) == before


def _env(tmp_path: Path, state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_"))}
    env.update(PF_FHIR_BASE_URL="http://127.0.0.1:9/fhir", PFSYNC_SOURCE_NAME="a",
               PFSYNC_STATE_DIR=str(state_dir), MEDPLUM_BASE_URL="http://127.0.0.1:9/",
               PFSYNC_LOG_FORMAT="json", PF_CLIENT_ID="c", PF_CLIENT_SECRET="s", MEDPLUM_CLIENT_ID="m",
               MEDPLUM_CLIENT_SECRET="ms")  # fmt: skip
    return env


def test_cli_sync_every_keeps_running_and_stops_on_sigterm(tmp_path: Path) -> None:
    """With the source locked by someone else each run exits 8; the loop goes on until SIGTERM, exit 0."""
    state_dir = tmp_path / "state"
    lock = FileLock.acquire(state_dir / "a" / "lock", Holder(4242, "other-host", "2026-01-01T00:00:00.000Z"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfsync", "sync", "--every", "50ms", "--run-on-startup"],
        env=_env(tmp_path, state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        summaries = [orjson.loads(proc.stdout.readline()) for _ in range(3)]  # three runs happened
        proc.send_signal(signal.SIGTERM)
        # communicate, not wait: the child keeps logging until it stops, and a full pipe that
        # nobody reads would block it (and this test) forever.
        proc.communicate(timeout=30)
        code = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
        lock.release()
    assert code == 0
    for summary in summaries:
        assert summary["event"] == "sync_summary" and summary["exitCode"] == ExitCode.LOCKED
        assert "pid 4242 on other-host" in summary["sources"][0]["error"]


def test_cli_sync_locked_exits_8_naming_holder(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    lock = FileLock.acquire(state_dir / "a" / "lock", Holder(4242, "other-host", "2026-01-01T00:00:00.000Z"))
    try:
        done = subprocess.run([sys.executable, "-m", "pfsync", "sync"], env=_env(tmp_path, state_dir),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        lock.release()
    assert done.returncode == ExitCode.LOCKED, done.stderr
    assert "pid 4242 on other-host" in done.stdout


def test_cli_sync_disabled_is_a_no_op(tmp_path: Path) -> None:
    env = {**_env(tmp_path, tmp_path / "state"), "PF_SYNC_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-m", "pfsync", "sync"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["sources"] == []
