"""What every command shares: global options, building Settings at the edge, and error rendering.

The CLI only parses, builds settings, calls the library and renders (STYLE.md: sqlite-utils).
Every expected failure ends here: a PfsyncError becomes one redacted message with a hint on
stderr and its stable exit code (pfsync.errors); anything else is exit 1 with no traceback
unless -v asks for one (and even then redacted).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from pfsync.errors import ExitCode, PfsyncError, exit_code_for
from pfsync.log import make_console, setup_logging
from pfsync.redact import redact
from pfsync.settings import Settings, load_settings

T = TypeVar("T")


@dataclass
class GlobalOptions:
    config: Path | None = None
    verbosity: int = 0
    log_format: str | None = None


def state(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_root().obj
    if not isinstance(obj, GlobalOptions):
        obj = GlobalOptions()
        ctx.find_root().obj = obj
    return obj


def err_console() -> Console:
    return make_console(sys.stderr)


def out_console() -> Console:
    return make_console(sys.stdout, stderr=False)


def build_settings(ctx: typer.Context, flags: dict[str, Any] | None = None) -> Settings:
    """Resolve settings once: flags > environment > TOML file > defaults; set up logging."""
    opts = state(ctx)
    all_flags = dict(flags or {})
    if opts.log_format:
        all_flags["log.format"] = opts.log_format
    settings = load_settings(flags=all_flags, env=dict(os.environ), config_path=opts.config)
    logger = setup_logging(settings.log_format, opts.verbosity)
    for warning in settings.warnings:
        logger.warning(warning)
    return settings


def fail(exc: BaseException, verbosity: int = 0) -> NoReturn:
    """Render an error on stderr (redacted) and exit with its code."""
    console = err_console()
    import httpx

    if isinstance(exc, httpx.HTTPError):  # escaped the layer that should have handled it
        from pfsync.http import protocol_error

        exc = protocol_error(exc)
    if isinstance(exc, PfsyncError):
        console.print(f"error: {redact(exc.message)}", style="bold red", markup=False, highlight=False)
        if exc.hint:
            console.print(f"hint: {redact(exc.hint)}", style="yellow", markup=False, highlight=False)
        if verbosity > 1:
            console.print(redact("".join(traceback.format_exception(exc))), markup=False, highlight=False)
    elif isinstance(exc, KeyboardInterrupt):
        console.print("interrupted", markup=False)
    else:
        console.print(
            f"unexpected error: {exc.__class__.__name__}: {redact(str(exc))}",
            style="bold red",
            markup=False,
            highlight=False,
        )
        if verbosity > 0:
            console.print(redact("".join(traceback.format_exception(exc))), markup=False, highlight=False)
        else:
            console.print("hint: run again with -v to see where it happened", markup=False)
    raise typer.Exit(exit_code_for(exc))


@contextmanager
def errors_handled(ctx: typer.Context) -> Iterator[None]:
    """Map any exception raised inside to a clean message and a stable exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except (PfsyncError, KeyboardInterrupt) as exc:
        fail(exc, state(ctx).verbosity)
    except Exception as exc:
        logging.getLogger("pfsync").debug("unexpected error", exc_info=True)
        fail(exc, state(ctx).verbosity)


def run(ctx: typer.Context, fn: Callable[[], T]) -> T:
    with errors_handled(ctx):
        return fn()
    raise AssertionError("unreachable")  # pragma: no cover


def exit_with(code: ExitCode | int) -> NoReturn:
    raise typer.Exit(int(code))


# Options shared by several commands. Every option names its environment variable (--help shows it).
SourceOpt = Annotated[
    str | None,
    typer.Option("--source", envvar="PFSYNC_SOURCE", show_envvar=True, help="Only this source (by name)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="PFSYNC_STATE_DIR",
        show_envvar=True,
        help="Directory of checkpoints, id maps, exports, quarantine and retry queue [default: .pfsync].",
    ),
]


def not_implemented(ctx: typer.Context, command: str) -> NoReturn:
    """Commands whose engine has not landed fail loudly, never pretend to succeed.

    Settings are still resolved first, so a broken config is reported as such (exit 3)."""
    from pfsync.errors import NotImplementedYetError

    with errors_handled(ctx):
        build_settings(ctx)
        raise NotImplementedYetError(
            f"`pfsync {command}` is not implemented yet",
            hint="see the README's status section for what works today",
        )
    raise AssertionError("unreachable")  # pragma: no cover
