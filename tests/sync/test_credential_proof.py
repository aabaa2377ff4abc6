"""Every run proves both sets of credentials (issue 16, criterion 5), over real HTTP."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from sync_helpers import checkpoint, sync_env
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.errors import ExitCode
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

runner = CliRunner()


@pytest.mark.parametrize("medplum_auth", ["token", "basic"])
def test_a_refused_medplum_secret_fails_the_run_even_when_nothing_changed(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, medplum_auth: str
) -> None:
    env = sync_env(
        source, target, tmp_path / "state", PF_RESOURCE_TYPES="Patient", PFSYNC_MEDPLUM_AUTH=medplum_auth
    )
    first = runner.invoke(app, ["sync", "--json"], env=env)
    assert first.exit_code == 0, first.output

    # Nothing changed at the source: still one token request each (the tokens the run then uses).
    tokens = source.stats.count("token")
    target.stats.reset()
    again = runner.invoke(app, ["sync", "--json"], env=env)
    assert again.exit_code == 0, again.output
    assert source.stats.count("token") == tokens + 1
    assert target.stats.token_requests == (1 if medplum_auth == "token" else 0)

    done = checkpoint(tmp_path / "state")["transactionTime"]
    revoked = runner.invoke(app, ["sync", "--json"], env={**env, "MEDPLUM_CLIENT_SECRET": "revoked"})
    assert revoked.exit_code == ExitCode.AUTH, revoked.output
    assert "revoked" not in revoked.output
    assert checkpoint(tmp_path / "state")["transactionTime"] == done  # did not move
    status = runner.invoke(app, ["status", "--json"], env=env)
    assert status.exit_code == ExitCode.UNHEALTHY, status.output
    (row,) = orjson.loads(status.stdout)["sources"]
    assert row["healthy"] is False
