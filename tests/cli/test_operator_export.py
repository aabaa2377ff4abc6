"""`pfsync export` as an operator meets it (issue 17): a finished export directory is never handed
back as if it were new, and a FHIR-side 401 says why first, with a hint and a short URL."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.cli.common import shorten_urls
from pfsync.sandbox.source.server import SourceSandbox

pytestmark = pytest.mark.integration


def _env(sandbox: SourceSandbox, **extra: str) -> dict[str, str]:
    return {"PF_FHIR_BASE_URL": sandbox.base_url(), "PF_CLIENT_ID": "pfsync-sandbox",
            "PF_CLIENT_SECRET": "sandbox-secret", "PF_RESOURCE_TYPES": "Patient,Condition", **extra}  # fmt: skip


def _export(sandbox: SourceSandbox, out: Path, *args: str, fmt: str = "json") -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, ["--log-format", fmt, "export", "--out", str(out), *args], env=_env(sandbox)
    )
    return result.exit_code, result.stdout, result.stderr


def _summary(stdout: str) -> dict[str, object]:
    line = [ln for ln in stdout.splitlines() if ln.startswith('{"event":"export_summary"')][-1]
    return dict(orjson.loads(line)["exports"][0])


def test_export_into_a_finished_directory_is_refused_or_replaced(
    source: SourceSandbox, tmp_path: Path
) -> None:
    out = tmp_path / "daily"
    code, stdout, _ = _export(source, out)
    assert code == 0
    first = _summary(stdout)
    code, stdout, stderr = _export(source, out, fmt="human")
    assert code == 2, stderr
    assert "already holds a complete export" in stderr and "--replace" in stderr
    assert source.stats.count("kickoff") == 1  # nothing was asked of the server
    code, stdout, _ = _export(source, out, "--replace")
    assert code == 0
    again = _summary(stdout)
    assert again["resumed"] is False and again["exportId"] != first["exportId"]
    assert source.stats.count("kickoff") == 2


def test_export_fhir_side_401_gives_the_reason_first_and_a_hint(
    source: SourceSandbox, tmp_path: Path
) -> None:
    source.faults.server_error("kickoff", times=None, status=401)
    code, _, stderr = _export(source, tmp_path / "x", fmt="human")
    assert code == 4, stderr
    error = next(line for line in stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: export kick-off refused (401): Simulated server error 401")
    assert "hint: the FHIR server refuses the access token" in stderr


def test_long_urls_are_shortened_in_error_lines() -> None:
    url = "https://ehr.example.com/fhir/r4/v1/practice/Patient/$export?_type=" + ",".join(
        ["Observation"] * 60
    )
    text = shorten_urls(f"refused (401): Invalid token (at {url})")
    assert text == "refused (401): Invalid token (at https://ehr.example.com/…/$export?…)"
    assert shorten_urls("at https://short.example/x") == "at https://short.example/x"


def test_export_takes_the_source_url_as_a_flag(source: SourceSandbox, tmp_path: Path) -> None:
    env = {k: v for k, v in _env(source).items() if k != "PF_FHIR_BASE_URL"}
    args = ["--log-format", "json", "export", "--source-url", source.base_url(), "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert _summary(result.stdout)["files"] == 2
