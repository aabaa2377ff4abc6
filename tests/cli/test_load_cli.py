"""`pfsync load` end to end through the CLI against the target sandbox."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from load_helpers import SYNTHEA_SMALL, write_ndjson
from target_fixtures import TARGET_CLIENT, TARGET_SECRET
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.sandbox.target.server import TargetSandbox


@pytest.fixture
def env(target: TargetSandbox, tmp_path: Path) -> dict[str, str]:
    return {
        "MEDPLUM_BASE_URL": target.base_url,
        "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
        "MEDPLUM_CLIENT_SECRET": TARGET_SECRET,
        "PFSYNC_STATE_DIR": str(tmp_path / "state"),
        "PFSYNC_LOG_FORMAT": "json",
    }


def test_cli_load_directory_then_unchanged(
    target: TargetSandbox, env: dict[str, str], tmp_path: Path
) -> None:
    files = tmp_path / "in"
    files.mkdir()
    for name in ("Patient", "Organization", "Practitioner", "Encounter"):
        (files / f"{name}.ndjson").write_bytes((SYNTHEA_SMALL / f"{name}.ndjson").read_bytes())
    runner = CliRunner()
    result = runner.invoke(app, ["load", str(files), "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert doc["byType"]["Encounter"]["created"] == 431
    assert target.count() == 17 + 36 + 36 + 431
    again = runner.invoke(app, ["load", str(files), "--json"], env=env)
    assert again.exit_code == 0
    assert orjson.loads(again.stdout.strip().splitlines()[-1])["byType"]["Encounter"]["unchanged"] == 431
    assert TARGET_SECRET not in result.output + again.output


def test_cli_load_dry_run_writes_nothing(target: TargetSandbox, env: dict[str, str]) -> None:
    # Tables are for terminals (README "Output"); TTY_COMPATIBLE=1 asks for them off one.
    result = CliRunner().invoke(app, ["load", str(SYNTHEA_SMALL / "Patient.ndjson"), "--dry-run"],
                                env={**env, "TTY_COMPATIBLE": "1"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "dry run" in result.stdout and "17" in result.stdout
    # 17 creates at ~100 points each (docs/medplum.md quota costs), not the dry run's own searches.
    assert "the load would cost about 1,700 quota points" in result.stdout
    assert target.count() == 0


def test_cli_load_quarantine_exits_6(target: TargetSandbox, env: dict[str, str], tmp_path: Path) -> None:
    data = write_ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": "a", "foo": 1},
                                                {"resourceType": "Patient", "id": "b"}])  # fmt: skip
    result = CliRunner().invoke(app, ["load", str(data)], env=env)
    assert result.exit_code == 6, result.output
    assert (tmp_path / "state" / "default" / "quarantine.ndjson").is_file()
    assert target.count("Patient") == 1


def test_cli_load_needs_medplum_credentials(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "MEDPLUM_CLIENT_SECRET"}
    result = CliRunner().invoke(app, ["load", str(SYNTHEA_SMALL / "Patient.ndjson")], env=env)
    assert result.exit_code == 3
    assert "MEDPLUM_CLIENT_SECRET" in result.output


def test_cli_load_export_dir_applies_its_deleted_files(
    target: TargetSandbox, env: dict[str, str], tmp_path: Path
) -> None:
    # The layout `pfsync export` writes: <Type>.<n>.ndjson plus deleted.<n>.ndjson (Bulk Data v2:
    # Bundles of DELETE requests). The deleted file is applied after the resources, never loaded.
    export = tmp_path / "export"
    export.mkdir()
    patients = [orjson.loads(x) for x in (SYNTHEA_SMALL / "Patient.ndjson").read_bytes().splitlines()[:3]]
    write_ndjson(export / "Patient.1.ndjson", patients)
    gone = patients[0]["id"]
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"request": {"method": "DELETE", "url": f"Patient/{gone}"}}]}  # fmt: skip
    write_ndjson(export / "deleted.1.ndjson", [bundle])
    result = CliRunner().invoke(app, ["load", str(export), "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout.strip().splitlines()[-1])
    # (The loader may cancel a create still queued for a resource the same load deletes.)
    assert doc["byType"]["Patient"]["deleted"] == 1
    assert target.count("Patient") == 2
    assert all(i.get("value") != gone for p in target.resources("Patient") for i in p["identifier"])
    assert target.count("Bundle") == 0
