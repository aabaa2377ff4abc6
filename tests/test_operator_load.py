"""`pfsync load` as an operator reads it (issue 17): one quarantined resource is "1 resource",
the hint names the quarantine file to replay, and --medplum-url / --state-dir work as the README says."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from load_helpers import write_ndjson
from target_fixtures import TARGET_CLIENT, TARGET_SECRET
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.sandbox.target.server import TargetSandbox

pytestmark = pytest.mark.integration


def test_load_quarantine_error_names_the_file_to_replay(target: TargetSandbox, tmp_path: Path) -> None:
    data = write_ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": "a", "foo": 1},
                                                {"resourceType": "Patient", "id": "b"}])  # fmt: skip
    state = tmp_path / "elsewhere"
    # Only flags for the URL and the state directory (README settings table), no environment for them.
    env = {"MEDPLUM_CLIENT_ID": TARGET_CLIENT, "MEDPLUM_CLIENT_SECRET": TARGET_SECRET}
    args = [
        "--log-format",
        "human",
        "load",
        str(data),
        "--medplum-url",
        target.base_url,
        "--state-dir",
        str(state),
    ]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 6, result.output
    quarantine = state / "default" / "quarantine.ndjson"
    assert quarantine.is_file()
    assert "error: 1 resource was quarantined" in result.stderr
    assert f"pfsync load {quarantine}" in result.stderr
    doc = orjson.loads(result.stdout)  # not a terminal: the result is one JSON object
    assert doc["byType"]["Patient"]["quarantined"] == 1 and doc["byType"]["Patient"]["created"] == 1


NOWHERE = {"MEDPLUM_BASE_URL": "http://127.0.0.1:9/", "MEDPLUM_CLIENT_ID": "m", "MEDPLUM_CLIENT_SECRET": "s",
           "PFSYNC_HTTP_RETRIES": "0", "PFSYNC_LOG_FORMAT": "human"}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "code", "fragment"),
    [
        (bytes(range(256)) * 16, 2, "not NDJSON (line 1 does not start a JSON object)"),
        (b"Patient,id\n1,a\n", 2, "not NDJSON"),
        (
            b'{"id": "a", "name": "no type"}\n{"id": "b"}\n',
            2,
            "JSON, but not FHIR resources (no resourceType",
        ),
        (b"", 0, "is empty: nothing to load from it"),
        (b"\n\n", 0, "is empty"),
    ],
)
def test_load_refuses_what_is_not_ndjson_before_any_request(
    tmp_path: Path, content: bytes, code: int, fragment: str
) -> None:
    path = tmp_path / "input.ndjson"
    path.write_bytes(content)
    # Medplum is unreachable (port 9): reaching the network would be exit 75.
    result = CliRunner().invoke(
        app, ["load", str(path)], env={**NOWHERE, "PFSYNC_STATE_DIR": str(tmp_path / "s")}
    )
    assert result.exit_code == code, result.output
    assert fragment in result.stderr


def test_load_a_resource_too_large_for_a_bundle_hints_at_async_batch(
    target: TargetSandbox, tmp_path: Path
) -> None:
    div = '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * 1_200_000 + "</div>"
    big = {"resourceType": "Patient", "id": "big", "text": {"status": "generated", "div": div}}
    data = write_ndjson(tmp_path / "big.ndjson", [big])
    env = {"MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_STATE_DIR": str(tmp_path / "s"),
           "PFSYNC_LOG_FORMAT": "human"}  # fmt: skip
    result = CliRunner().invoke(app, ["load", str(data)], env=env)
    assert result.exit_code == 6, result.output
    assert "hint: 1 resource too large for a synchronous Bundle load with --async-batch" in result.stderr
    assert "pfsync load --async-batch " in result.stderr


def test_load_one_bad_first_line_among_resources_is_left_to_quarantine(
    target: TargetSandbox, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(b'{"id": "x"}\n{"resourceType": "Patient", "id": "p1"}\n')
    env = {"MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_STATE_DIR": str(tmp_path / "s")}  # fmt: skip
    result = CliRunner().invoke(app, ["load", str(path)], env=env)
    assert result.exit_code == 6, result.output  # the bad line quarantined, the Patient loaded
    assert target.count("Patient") == 1
