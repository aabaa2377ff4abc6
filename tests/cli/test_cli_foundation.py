"""The CLI contract: help everywhere with env vars, --version, clean errors, exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import pfsync.cli.common as cli_common
from pfsync import __version__
from pfsync.cli import app
from pfsync.cli.common import errors_handled
from pfsync.core.errors import ConfigError

runner = CliRunner()

COMMANDS = [
    ["auth", "test"],
    ["auth", "keygen"],
    ["export"],
    ["load"],
    ["sync"],
    ["status"],
    ["verify"],
    ["sandbox"],
]


def test_cli_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"pfsync {__version__}"


def test_cli_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pfsync", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_cli_root_help_lists_every_command_and_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("auth", "export", "load", "sync", "status", "verify", "sandbox"):
        assert cmd in result.stdout
    assert "75 temporary" in " ".join(result.stdout.split())


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_cli_every_command_has_real_help_with_examples(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "Examples:" in text and "pfsync " + command[0] in text
    assert len(text) > 200


@pytest.mark.parametrize("command", [["sync"], ["status"], ["export"], ["auth", "test"]], ids=" ".join)
def test_cli_options_show_their_env_var(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert "env var:" in result.stdout


def test_cli_usage_error_is_exit_2_without_traceback() -> None:
    result = runner.invoke(app, ["sync", "--no-such-flag"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def _tiny_app() -> typer.Typer:
    tiny = typer.Typer()

    @tiny.command()
    def boom(ctx: typer.Context, kind: str) -> None:
        with errors_handled(ctx):
            if kind == "config":
                raise ConfigError("source.base_url is missing", hint="set PF_FHIR_BASE_URL")
            raise ValueError("a bug")

    @tiny.command()
    def other() -> None:
        return None

    return tiny


def test_cli_config_error_is_one_message_with_hint_and_exit_3() -> None:
    result = runner.invoke(_tiny_app(), ["boom", "config"], env={"PFSYNC_LOG_FORMAT": "human"})
    assert result.exit_code == 3
    assert "error: source.base_url is missing" in result.output
    assert "hint: set PF_FHIR_BASE_URL" in result.output
    assert "Traceback" not in result.output


def test_cli_has_no_not_implemented_stub_left() -> None:
    # Every command is implemented: exit code 10 is retired and its helper is gone.
    assert not hasattr(cli_common, "not_implemented")


def test_cli_unexpected_error_is_exit_1_without_traceback() -> None:
    result = runner.invoke(_tiny_app(), ["boom", "bug"], env={"PFSYNC_LOG_FORMAT": "human"})
    assert result.exit_code == 1
    assert "unexpected error: ValueError: a bug" in result.output
    assert "Traceback" not in result.output


def test_cli_bad_config_file_exits_3_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "pfsync.toml").write_text("[export\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_"))}
    out = subprocess.run(
        [sys.executable, "-m", "pfsync", "status"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 3, out.stderr
    assert "not valid TOML" in out.stderr
    assert "Traceback" not in out.stderr
