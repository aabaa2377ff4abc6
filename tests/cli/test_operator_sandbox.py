"""`pfsync sandbox` as a user runs it (issue 17): clients that hang up leave no traceback, SIGTERM
removes a temporary state directory, and the background example of its --help does not hang."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PFSYNC = f"{sys.executable} -m pfsync"


def _read_env(env_file: Path) -> dict[str, str]:
    env = {}
    for line in env_file.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'")
    return env


def _hang_up_abruptly(port: int) -> None:
    """A keep-alive request, then a reset (SO_LINGER 0) while the server waits for the next one."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.recv(1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_sandbox_without_state_leaves_nothing_and_prints_no_traceback(tmp_path: Path) -> None:
    env_file = tmp_path / "sb.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfsync", "sandbox", "--source-port", "0", "--target-port", "0",
         "--env-file", str(env_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        env = _read_env(env_file)
        state_dir = Path(env["PF_CLIENT_SECRET"]).parent
        assert state_dir.is_dir()
        for base in (env["PF_FHIR_BASE_URL"], env["MEDPLUM_BASE_URL"]):
            for _ in range(3):
                _hang_up_abruptly(int(urlsplit(base).port or 0))
        time.sleep(0.2)  # let the handler threads meet the reset before stopping
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err
    assert not state_dir.exists()
    # stderr is not a terminal: one JSON object per line (README "Output"), the ready and stop events.
    events = [orjson.loads(line)["event"] for line in err.splitlines()]
    assert events == ["sandbox_ready", "sandbox_stopped"]


def test_sandbox_help_background_example_does_not_hang(tmp_path: Path) -> None:
    env_file = tmp_path / "sb.env"
    # The example of `pfsync sandbox --help`, as a user pastes it (pfsync spelled as this interpreter).
    script = (
        f"{PFSYNC} sandbox --source-port 0 --target-port 0 --env-file {env_file} >/dev/null 2>&1 &\n"
        f"until [ -s {env_file} ]; do sleep 0.2; done; . {env_file}\n"
        'echo "source=$PF_FHIR_BASE_URL"\n'
        "kill $!\nwait $!\n"
    )
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=90,
                          env={**os.environ})  # fmt: skip
    assert "source=http://127.0.0.1:" in done.stdout, done.stderr


def test_sandbox_help_shows_that_example() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pfsync", "sandbox", "--help"], capture_output=True, text=True
    )
    text = out.stdout
    assert "pfsync sandbox --env-file /tmp/sb.env >/dev/null 2>&1 &" in text
    assert "until [ -s /tmp/sb.env ]; do sleep 0.2; done; . /tmp/sb.env" in text
    assert 'eval "$(' not in text
