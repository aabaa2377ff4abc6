"""The README tells the truth about the CLI: every command, setting and exit code is documented."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.errors import ExitCode
from pfsync.core.settings import SPECS
from pfsync.core.settings_doc import render_into

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def test_readme_settings_table_is_up_to_date() -> None:
    text = README.read_text()
    assert render_into(text) == text, "run scripts/config_table to regenerate the README's settings table"


def test_readme_mentions_every_env_var() -> None:
    text = README.read_text()
    for spec in SPECS:
        for name in spec.env:
            assert f"`{name}`" in text, name


def test_readme_starts_with_exactly_two_setup_commands() -> None:
    text = README.read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("```", 2)[1]
    commands = [line for line in section.splitlines()[1:] if line.strip()]
    assert len(commands) == 2
    assert commands[0].startswith("scripts/demo") and commands[1].startswith("scripts/test")
    assert Path(README.parent / "scripts/demo").exists() and Path(README.parent / "scripts/test").exists()


def test_readme_documents_every_command() -> None:
    text = README.read_text()
    result = runner.invoke(app, ["--help"])
    commands = re.findall(r"^\s{2}(\w+)\s", result.stdout.split("Commands:")[1], re.MULTILINE)
    assert commands
    for command in commands:
        assert f"`pfsync {command}" in text, command


def test_readme_documents_every_exit_code() -> None:
    text = README.read_text()
    for code in ExitCode:
        assert f"| {code.value} |" in text
