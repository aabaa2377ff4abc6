"""The README checked against the CLI itself (issue 17, criterion 5): every flag of the settings
table exists on a command, the documented exit codes are exactly the live ones (10 retired) and each
is reachable, and every `pfsync ...` example (README and --help) parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core import errors
from pfsync.core.errors import ExitCode

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = get_command(app)
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
RETIRED = {10}


def _table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after `heading`, as stripped cells."""
    text = README.read_text().split(heading, 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    end = next((i for i, line in enumerate(text.splitlines()) if line.startswith("|")), 0)
    block = []
    for line in text.splitlines()[end:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows and block
    return block[2:]  # without the header and its --- line


def _help(command: list[str]) -> str:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return result.stdout


def _parse(args: list[str]) -> Any:
    """Parse a command line with the real CLI, without running it (flags, values, arguments)."""

    def remaining(ctx: Any) -> list[str]:  # a group keeps the sub-command's name apart from its args
        return [*getattr(ctx, "_protected_args", []), *ctx.args]

    ctx = ROOT.make_context("pfsync", list(args))
    command: Any = ROOT
    rest = remaining(ctx)
    while hasattr(command, "resolve_command") and rest:
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        rest = remaining(ctx)
    assert not rest, f"unexpected arguments {rest}"
    return ctx


# ---- the settings table ------------------------------------------------------------------------


def test_every_flag_of_the_settings_table_exists_on_a_command() -> None:
    flags = {cell.strip("`") for row in _table("settings-table:begin") for cell in [row[2]] if cell}
    assert {"--source-url", "--medplum-url", "--state-dir", "--types", "--log-format"} <= flags
    helps = {" ".join(c): _help(c) for c in COMMANDS} | {"": _help([])}
    for flag in sorted(flags):
        where = [name for name, text in helps.items() if re.search(rf"(^|\s){re.escape(flag)}[\s,]", text)]
        assert where, f"README settings table lists {flag}, but no command accepts it"


@pytest.mark.parametrize("flag", ["--source-url", "--medplum-url", "--state-dir"])
def test_common_flags_work_where_settings_are_read(flag: str, tmp_path: Path) -> None:
    value = "http://127.0.0.1:9/" if flag.endswith("url") else str(tmp_path)
    for command in (
        ["sync"],
        ["verify"],
        ["load", "x.ndjson"],
        ["status"],
        ["auth", "test"],
        ["export", "--out", "d"],
    ):
        accepts = flag in _help(command[:2] if command[0] == "auth" else command[:1])
        if accepts:
            _parse([*command, flag, value])
    assert any(flag in _help(c) for c in (["sync"], ["load"], ["verify"]))


# ---- exit codes --------------------------------------------------------------------------------


def test_documented_exit_codes_are_the_live_ones() -> None:
    documented = {int(row[0]): row[1] for row in _table("## Exit codes")}
    live = {c.value for c in ExitCode}
    assert set(documented) == live | RETIRED
    for code in RETIRED:
        assert "Retired" in documented[code] and code not in live
    root_help = " ".join(_help([]).split())
    for code in live - {0}:
        assert re.search(rf"\b{code} ", root_help), f"pfsync --help does not list exit code {code}"


def test_every_documented_failure_code_has_an_error_that_raises_it() -> None:
    classes: list[type[errors.PfsyncError]] = []
    todo: list[type[errors.PfsyncError]] = [errors.PfsyncError]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    raised = {int(cls.exit_code) for cls in classes}
    for code in {c.value for c in ExitCode} - {0}:
        assert code in raised, f"exit code {code} is documented but no error class carries it"


NOWHERE = {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PF_CLIENT_ID": "c", "PF_CLIENT_SECRET": "s",
           "MEDPLUM_BASE_URL": "http://127.0.0.1:9/", "MEDPLUM_CLIENT_ID": "m", "MEDPLUM_CLIENT_SECRET": "s",
           "PFSYNC_HTTP_RETRIES": "0"}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["--version"], {}, 0),
        (
            ["export", "--since", "yesterday", "--out", "d"],
            {},
            2,
        ),  # click's own: test_command_line_mistakes_*
        (["status"], {"PF_SYNC_ENABLED": "maybe"}, 3),
        (["status"], {}, 9),  # never ran: unhealthy
        (["sync"], {}, 75),  # nothing listens on port 9
    ],
)
def test_documented_exit_codes_are_reachable_from_the_cli(
    tmp_path: Path, args: list[str], env: dict[str, str], code: int
) -> None:
    # The codes that need a server are reached by their own tests: 4 test_quiet_sync_with_a_wrong_
    # medplum_secret_still_says_why, 5 test_cli_export_failed_export_exits_5, 6
    # test_load_quarantine_error_names_the_file_to_replay, 7 test_status_corrupt_checkpoint_is_exit_7,
    # 8 test_sync_concurrent_runs_second_refused_exit_8_naming_holder, 11
    # test_verify_cli_json_exit_codes_and_fix, 130 test_cli_export_sigterm_stops_cleanly_and_resumes.
    env = {**NOWHERE, "PFSYNC_STATE_DIR": str(tmp_path), "PFSYNC_LOG_FORMAT": "human", **env}
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == code, result.output
    if code:  # every failure ends with one error:/hint: pair
        lines = result.stderr.splitlines()
        assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
        assert sum(line.startswith("hint: ") for line in lines) == 1, result.stderr


# ---- examples ----------------------------------------------------------------------------------


def _example_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("pfsync "):
            lines.append(line.split(" >", 1)[0].split(" &", 1)[0])
    return lines


def _args(line: str) -> list[str]:
    line = re.sub(r"\$\{?[A-Z_]+\}?", "0", line)  # $JOB_COMPLETION_INDEX and the like
    return shlex.split(line)[1:]


def test_readme_examples_parse_with_the_cli() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    lines = [line for block in blocks for line in _example_lines(block)]
    assert len(lines) >= 6
    for line in lines:
        _parse(_args(line))


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_examples_parse_with_the_cli(command: list[str]) -> None:
    text = _help(command).split("Examples:", 1)[1].split("Options:", 1)[0]
    lines = _example_lines(text)
    assert lines
    for line in lines:
        _parse(_args(line))


def test_readme_toml_example_is_a_valid_config(tmp_path: Path) -> None:
    from pfsync.core.settings import load_settings

    (toml,) = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    for path in sorted(set(re.findall(r'"(/run/secrets/[^"]+)"', toml))):
        local = tmp_path / Path(path).name
        local.write_text("not-a-real-secret\n")
        local.chmod(0o600)
        toml = toml.replace(path, str(local))
    (tmp_path / "pfsync.toml").write_text(toml)
    settings = load_settings(env={}, config_path=tmp_path / "pfsync.toml")
    assert [s.name for s in settings.sources] == ["practice-a", "practice-b"]
    assert settings.medplum.client_secret is not None


def test_help_has_no_python_type_names() -> None:
    for command in [[], *COMMANDS]:
        text = _help(command)
        assert "<list[" not in text and "range>" not in text and "{" not in text, (command, text)
        assert "[default: 0]" not in text
