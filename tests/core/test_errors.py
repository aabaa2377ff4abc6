"""The error tree maps to stable, documented exit codes."""

from __future__ import annotations

import pytest

from pfsync.core import errors
from pfsync.core.errors import ExitCode, HTTPError, exit_code_for

EXPECTED = {
    errors.PfsyncError: 1,
    errors.UsageError: 2,
    errors.ConfigError: 3,
    errors.AuthError: 4,
    errors.ExportError: 5,
    errors.PartialLoadError: 6,
    errors.StateError: 7,
    errors.LockedError: 8,
    errors.UnhealthyError: 9,
    errors.VerifyMismatchError: 11,
    errors.TemporaryError: 75,
    errors.InterruptedRunError: 130,
}


@pytest.mark.parametrize(("cls", "code"), EXPECTED.items())
def test_exit_code_for_each_error_class(cls: type[errors.PfsyncError], code: int) -> None:
    assert exit_code_for(cls("x")) == code


def test_exit_codes_are_unique_and_stable() -> None:
    values = [c.value for c in ExitCode]
    assert len(values) == len(set(values))
    assert ExitCode.TEMPORARY.value == 75 and ExitCode.INTERRUPTED.value == 130


def test_retired_exit_code_10_is_not_reused() -> None:
    assert 10 not in {c.value for c in ExitCode}
    assert not hasattr(errors, "NotImplementedYetError")


@pytest.mark.parametrize(
    ("status", "code", "temporary"),
    [(None, 75, True), (503, 75, True), (429, 75, True), (408, 75, True), (401, 4, False), (403, 4, False),
     (400, 1, False), (404, 1, False)],
)  # fmt: skip
def test_http_error_exit_code_follows_status(status: int | None, code: int, temporary: bool) -> None:
    exc = HTTPError("x", method="GET", url="https://x", status=status)
    assert exit_code_for(exc) == code
    assert exc.temporary is temporary


def test_unexpected_exceptions_exit_1_and_ctrl_c_130() -> None:
    assert exit_code_for(ValueError("x")) == 1
    assert exit_code_for(KeyboardInterrupt()) == 130


def test_every_exit_code_is_in_the_readme(repo_root: str) -> None:
    from pathlib import Path

    readme = (Path(repo_root) / "README.md").read_text()
    for code in ExitCode:
        assert f"| {code.value} |" in readme, f"exit code {code.value} ({code.name}) missing from README"
