"""No secret reaches any byte we write: every command, run for real against the sandboxes.

Known secrets (client secrets, a private key, every token the source sandbox issued) are
searched for in stdout, stderr (human and JSON logs, -vv) and every file pfsync wrote to its
state and export directories.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pfsync.sandbox.run import Sandboxes

COMMANDS = [
    ["auth", "test"],
    ["export", "--out", "{work}/export"],
    ["load", "{work}/export"],
    ["sync"],
    ["status"],
    ["verify", "--from", "{work}/export"],
]


@pytest.fixture
def boxes(tmp_path: Path, sandboxes_factory: Callable[..., Sandboxes]) -> Sandboxes:
    return sandboxes_factory(state_dir=tmp_path / "sandbox")


def _run(args: list[str], env: dict[str, str], work: Path) -> bytes:
    argv = [a.replace("{work}", str(work)) for a in args]
    out = subprocess.run(
        [sys.executable, "-m", "pfsync", "-vv", *argv], env=env, cwd=work, capture_output=True, timeout=240
    )
    assert out.returncode in (0, 6), (argv, out.returncode, out.stderr[-3000:])
    return out.stdout + out.stderr


@pytest.mark.parametrize("log_format", ["json", "human"])
def test_no_secret_in_any_output_or_file(boxes: Sandboxes, tmp_path: Path, log_format: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_"))}
    env.update(boxes.env)
    env.update({"PFSYNC_STATE_DIR": str(work / "state"), "PFSYNC_LOG_FORMAT": log_format,
                "PF_RESOURCE_TYPES": "Patient,Encounter,Condition,DocumentReference"})  # fmt: skip
    secrets = [
        Path(boxes.env["PF_CLIENT_SECRET"]).read_text(),
        Path(boxes.env["MEDPLUM_CLIENT_SECRET"]).read_text(),
    ]
    output = b"".join(_run(cmd, env, work) for cmd in COMMANDS)
    issued = list(boxes.source.state.auth.tokens)
    assert issued, "the commands never obtained a source token: the test would prove nothing"
    written = b"".join(p.read_bytes() for p in work.rglob("*") if p.is_file())
    for secret in [*secrets, *issued]:
        assert secret.encode() not in output, "a secret reached stdout/stderr"
        assert secret.encode() not in written, "a secret reached a file pfsync wrote"
    assert b"eyJ" not in output  # no JWT of any kind (assertions, Medplum tokens)
    assert b"Bearer " not in output and b"Basic " not in output
