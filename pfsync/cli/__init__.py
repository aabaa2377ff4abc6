"""The command-line interface: a thin layer over the library (one module per command group).

The command modules import the heavy parts of the library (export, sync, verify, key generation,
the sandboxes) inside the command functions, not at the top: `pfsync --help`, shell completion and
a mistyped option then answer without loading them. This is the only reason for imports inside
functions in pfsync; import-linter checks them like any other import (pyproject.toml).
"""

from __future__ import annotations

import sys

import typer

from pfsync.cli import auth as _auth  # noqa: F401  (registers commands)
from pfsync.cli import export as _export  # noqa: F401
from pfsync.cli import load as _load  # noqa: F401
from pfsync.cli import sandbox as _sandbox  # noqa: F401
from pfsync.cli import sync as _sync  # noqa: F401
from pfsync.cli import verify as _verify  # noqa: F401
from pfsync.cli.app import app
from pfsync.cli.common import error_format, report_error
from pfsync.core.arenas import cap_malloc_arenas

__all__ = ["app", "main"]


def main() -> None:
    """The `pfsync` entry point. A command-line mistake click finds (unknown option, bad value)
    is rendered like every other failure: one error:/hint: pair, or one JSON object with JSON logs."""
    cap_malloc_arenas()  # before any thread starts (pfsync.core.arenas says why)
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" or not hasattr(exc, "format_message"):
            show = getattr(exc, "show", None)
            if show is not None:
                show()
            sys.exit(int(getattr(exc, "exit_code", 2)))
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "pfsync"
        code = int(getattr(exc, "exit_code", 2))
        report_error(exc.format_message(), f"see `{where} --help`", code, error_type="UsageError",
                     fmt=_log_format_from_argv(sys.argv[1:]))  # fmt: skip
        sys.exit(code)
    sys.exit(code if isinstance(code, int) else 0)


def _log_format_from_argv(argv: list[str]) -> str:
    """--log-format as given on a command line click could not parse (else the usual choice)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--log-format=") else None
        if arg == "--log-format" and i + 1 < len(argv):
            value = argv[i + 1]
        if value in ("human", "json"):
            return value
    return error_format(None)
