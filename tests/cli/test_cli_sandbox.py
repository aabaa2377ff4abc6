"""`pfsync sandbox` as a user runs it: a real process that serves both sandboxes and prints the env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from server_fixtures import SandboxProcess

from pfsync.sandbox.source.server import SourceSandbox


def test_sandbox_command_serves_both_and_stops_on_sigterm(
    tmp_path: Path, sandbox_process: Callable[..., SandboxProcess]
) -> None:
    proc, env = sandbox_process(tmp_path)
    try:
        assert set(env) >= {"PF_FHIR_BASE_URL", "PF_CLIENT_ID", "PF_CLIENT_SECRET", "MEDPLUM_BASE_URL"}
        # Secrets are handed out as file paths (mode 0600), never printed.
        secret_file = Path(env["PF_CLIENT_SECRET"])
        assert secret_file.is_file() and (secret_file.stat().st_mode & 0o077) == 0
        base = env["PF_FHIR_BASE_URL"]
        assert base.startswith("http://127.0.0.1:")
        conf = httpx.get(base + "/.well-known/smart-configuration").json()
        assert conf["token_endpoint"] == base + "/token"
        token = httpx.post(
            conf["token_endpoint"],
            data={"grant_type": "client_credentials", "scope": "system/Patient.rs"},
            auth=(env["PF_CLIENT_ID"], secret_file.read_text()),
        )
        assert token.status_code == 200, token.text
        mp = env["MEDPLUM_BASE_URL"]
        mp_token = httpx.post(
            mp + "oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": env["MEDPLUM_CLIENT_ID"],
                "client_secret": Path(env["MEDPLUM_CLIENT_SECRET"]).read_text(),
            },
        )
        assert mp_token.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "sandboxes stopped" in err
    for secret in (Path(env["PF_CLIENT_SECRET"]).read_text(), Path(env["MEDPLUM_CLIENT_SECRET"]).read_text()):
        assert secret not in out and secret not in err


def test_sandbox_command_rejects_a_missing_data_dir(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pfsync", "sandbox", "--data", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
    )
    assert out.returncode == 2
    assert "not a directory" in out.stderr


def test_source_sandbox_restart_on_kept_state_keeps_changes_and_deletions(
    tmp_path: Path, source_factory: Callable[..., SourceSandbox]
) -> None:
    first = source_factory(state_dir=tmp_path / "src")
    try:
        patients = first.state.store.patient_ids(first.practices[0])
        assert first.delete("Patient", patients[0])
        port = int(first.server_url.rsplit(":", 1)[1])
    finally:
        first.stop()
    again = source_factory(state_dir=tmp_path / "src", port=port)
    try:
        assert patients[0] not in again.state.store.patient_ids(again.practices[0])
        assert patients[1] in again.state.store.patient_ids(again.practices[0])
    finally:
        again.stop()
