"""A new user's first hour, from the README's own snippets (issue 17, criterion 6): the demo, the
sandbox recipe (auth test, sync, status), the backfill recipe and the quarantine replay, run by bash
in a pseudo-terminal (tables and live progress) and off one (one JSON object per line)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = "@@exit"


def _block(heading: str) -> list[str]:
    """The lines of the first ```sh block after `heading` in the README."""
    text = README.read_text().split(heading, 1)[1]
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, heading
    return [line for line in block.group(1).splitlines() if line.strip()]


def _script(tmp: Path) -> tuple[str, list[str]]:
    """The README's snippets as one bash script; after each line an exit-code marker."""
    env_file = str(tmp / "sb.env")
    steps: list[str] = []
    # Port 0: several test runs share the machine (the README's default ports are 8710/8711).
    steps += [line.replace("/tmp/sb.env", env_file).replace("pfsync sandbox", "pfsync sandbox --source-port 0 --target-port 0")
              for line in _block("### Try it against the local sandboxes")]  # fmt: skip
    steps += _block("### Backfill a date range into files, then load them")
    # Something to replay: a resource the target refuses, quarantined; then its cause "fixed".
    steps += [
        """printf '{"resourceType":"Patient","id":"qa","foo":1}\\n' > bad.ndjson""",
        "pfsync load bad.ndjson",
        """sed -i 's/,"foo":1//' .pfsync/default/quarantine.ndjson""",
    ]
    steps += _block("### Replay quarantined resources after fixing their cause")
    lines = [line.split("  #", 1)[0].rstrip() for line in steps]
    body = []
    for i, line in enumerate(lines):
        body += [line, f'echo "{MARK} $? {i}"']
    body += ["kill %1", "wait"]
    return "\n".join(body) + "\n", lines


def _env(types: str = "Patient,Condition,Encounter") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_", "TTY_"))}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env.pop("NO_COLOR", None)
    env["PF_RESOURCE_TYPES"] = types  # fewer types than the default list: the same steps, seconds faster
    return env


def _in_pty(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {**env, "TERM": "xterm-256color"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
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
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace")


def _exits(output: str, lines: list[str]) -> dict[str, int]:
    found = {int(m.group(2)): int(m.group(1)) for m in re.finditer(rf"{MARK} (\d+) (\d+)", output)}
    return {lines[i]: code for i, code in sorted(found.items())}


EXPECTED = {"pfsync auth test": 0, "pfsync sync": 0, "pfsync status": 0, "pfsync load bad.ndjson": 6}


def _check_exits(exits: dict[str, int], lines: list[str], output: str) -> None:
    assert len(exits) == len(lines), output[-3000:]
    for line, code in exits.items():
        assert code == EXPECTED.get(line, 0), f"{line!r} exited {code}\n{output[-3000:]}"


def test_first_hour_in_a_terminal(tmp_path: Path) -> None:
    script, lines = _script(tmp_path)
    (tmp_path / "first-hour.sh").write_text(script)
    code, output = _in_pty(["bash", str(tmp_path / "first-hour.sh")], tmp_path, _env())
    assert code == 0, output[-3000:]
    _check_exits(_exits(output, lines), lines, output)
    assert "Traceback" not in output
    assert "default: ok (" in output  # sync's live line per source, at its end
    assert "pfsync status: default" in output and "…" not in output  # tables, nothing cut
    assert "error: 1 resource was quarantined" in output  # the human error line, not JSON
    assert '{"event"' not in output


def test_first_hour_off_a_terminal(tmp_path: Path) -> None:
    script, lines = _script(tmp_path)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _check_exits(_exits(done.stdout, lines), lines, done.stdout + done.stderr)
    assert "Traceback" not in done.stderr
    for line in done.stdout.splitlines():
        if not line.startswith(MARK):
            orjson.loads(line)  # every result is one JSON object
    for line in done.stderr.splitlines():
        doc = orjson.loads(line)  # every diagnostic is one JSON object with an event
        assert doc["event"], line
    errors = [orjson.loads(line) for line in done.stderr.splitlines() if '"event":"error"' in line]
    assert [e["exitCode"] for e in errors] == [6]


@pytest.mark.parametrize("terminal", [True, False], ids=["pty", "pipe"])
def test_demo_runs(tmp_path: Path, terminal: bool) -> None:
    if terminal:
        code, output = _in_pty([str(REPO / "scripts" / "demo")], tmp_path, _env())
        assert "default: ok (" in output and "pfsync sync: exit 0" in output
    else:
        done = subprocess.run([str(REPO / "scripts" / "demo")], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=240)  # fmt: skip
        code, output = done.returncode, done.stdout + done.stderr
        summary = [
            orjson.loads(ln) for ln in done.stdout.splitlines() if ln.startswith('{"event":"sync_summary"')
        ]
        assert summary and summary[0]["exitCode"] == 0
    assert code == 0, output[-3000:]
    assert "Traceback" not in output
