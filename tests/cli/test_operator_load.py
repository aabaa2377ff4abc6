"""`pfsync load` as an operator reads it (issue 17): one quarantined resource is "1 resource",
the hint names the quarantine file to replay, and --medplum-url / --state-dir work as the README says."""

from __future__ import annotations

import hashlib
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


def _big_patient(sid: str, size: int) -> dict[str, object]:
    div = '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * size + "</div>"
    return {"resourceType": "Patient", "id": sid, "text": {"status": "generated", "div": div}}


def _load_env(target: TargetSandbox, tmp_path: Path) -> dict[str, str]:
    return {"MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
            "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_STATE_DIR": str(tmp_path / "s"),
            "PFSYNC_LOG_FORMAT": "json"}  # fmt: skip


def test_load_a_resource_too_large_for_a_bundle_goes_as_an_async_batch_by_itself(
    target: TargetSandbox, tmp_path: Path
) -> None:
    small = [{"resourceType": "Patient", "id": f"p{i}"} for i in range(3)]
    data = write_ndjson(tmp_path / "big.ndjson", [small[0], _big_patient("big", 1_200_000), *small[1:]])
    result = CliRunner().invoke(app, ["load", str(data)], env=_load_env(target, tmp_path))
    assert result.exit_code == 0, result.output  # no manual --async-batch step
    assert orjson.loads(result.stdout)["byType"]["Patient"]["created"] == 4
    assert target.count("Patient") == 4 and target.count("AsyncJob") == 1  # the others stay synchronous
    routed = [orjson.loads(x) for x in result.stderr.splitlines() if '"event":"load_async_batch"' in x]
    assert [r["eventDetail"]["id"] for r in routed] == ["big"]


def test_load_a_resource_the_server_refuses_as_too_large_alone_is_sent_async(
    target: TargetSandbox, tmp_path: Path
) -> None:
    data = write_ndjson(tmp_path / "one.ndjson", [_big_patient("p1", 3000)])
    before = target.max_json_size
    target.max_json_size = 2000  # a server whose synchronous limit is lower than 1 MiB
    try:
        result = CliRunner().invoke(app, ["load", str(data)], env=_load_env(target, tmp_path))
    finally:
        target.max_json_size = before
    assert result.exit_code == 0, result.output
    assert target.count("Patient") == 1 and target.count("AsyncJob") == 1


def test_load_a_resource_too_large_even_for_an_async_batch_is_quarantined_with_a_hint(
    target: TargetSandbox, tmp_path: Path
) -> None:
    data = write_ndjson(tmp_path / "big.ndjson", [_big_patient("big", 1_200_000)])
    before = target.max_batch_size
    target.max_batch_size = 1_100_000  # a server configured below the resource's size
    try:
        result = CliRunner().invoke(app, ["load", str(data)], env={**_load_env(target, tmp_path),
                                                                    "PFSYNC_LOG_FORMAT": "human"})  # fmt: skip
    finally:
        target.max_batch_size = before
    assert result.exit_code == 6, result.output
    assert "too large for Medplum even as an async batch job" in result.stderr
    assert target.count("Patient") == 0


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


def test_load_of_an_export_whose_file_was_cut_short_warns_and_loads_the_rest(
    target: TargetSandbox, tmp_path: Path
) -> None:
    """An export directory whose file lost its second half since it was downloaded: the run goes
    on with what is there, and says which file and what it lacks (the lost lines are not loaded)."""
    export = tmp_path / "export"
    export.mkdir()
    patients = write_ndjson(
        export / "Patient.1.ndjson", [{"resourceType": "Patient", "id": f"p{i}"} for i in range(6)]
    )
    data = patients.read_bytes()
    files = [{"name": patients.name, "kind": "output", "type": "Patient", "lines": 6, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "url": ""}]  # fmt: skip
    (export / "manifest.json").write_bytes(orjson.dumps({"version": 1, "files": files}))
    patients.write_bytes(b"".join(data.splitlines(keepends=True)[:3]))
    result = CliRunner().invoke(app, ["load", str(export)], env=_load_env(target, tmp_path))
    assert result.exit_code == 0, result.output
    warned = [orjson.loads(x) for x in result.stderr.splitlines() if '"event":"load_export_changed"' in x]
    assert len(warned) == 1 and f"Patient.1.ndjson has {len(data) // 2} bytes" in warned[0]["message"]
    assert orjson.loads(result.stdout)["byType"]["Patient"]["created"] == 3 == target.count("Patient")
