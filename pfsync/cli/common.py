"""What every command shares: global options, building Settings at the edge, and error rendering.

The CLI only parses, builds settings, calls the library and renders (as in sqlite-utils).
Every expected failure ends here: a PfsyncError becomes one redacted message with a hint on
stderr and its stable exit code (pfsync.core.errors); anything else is exit 1 with no traceback
unless -v asks for one (and even then redacted).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from pfsync.core.errors import ExitCode, PfsyncError, exit_code_for
from pfsync.core.log import LOGGER_NAME, current_format, make_console, setup_logging
from pfsync.core.redact import redact
from pfsync.core.settings import SPEC_BY_KEY, Settings, load_settings
from pfsync.net.http import protocol_error

T = TypeVar("T")


@dataclass
class GlobalOptions:
    config: Path | None = None
    verbosity: int = 0
    log_format: str | None = None
    resolved_format: str | None = None  # human or json, once logging is set up


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


def result_table(title: str, first: str, names: Iterable[str] = ()) -> Table:
    """A result table for a terminal, narrow enough for 80 columns: no rules between columns, one
    space between them, and the first column (resource types, sources) never cut: `names` are its
    values, so its width is the longest of them (rich cut "AllergyIntolerance" to "Aller…")."""
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1, 0, 0), pad_edge=False,
                  header_style="bold underline")  # fmt: skip
    table.add_column(first, no_wrap=True, min_width=max((len(n) for n in names), default=len(first)))
    return table


# Flags every command that reads settings accepts (README's settings table); build_settings picks
# them up from the command's parameters by these names.
_COMMON_FLAGS = {"source_url": "source.base_url", "medplum_url": "medplum.base_url", "state_dir": "state.dir"}


def from_environment(ctx: typer.Context, name: str) -> bool:
    """Whether the parameter `name` took its value from its environment variable."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "ENVIRONMENT"


def _from_command_line(ctx: typer.Context, flag: str | None) -> bool:
    """False when the option behind `flag` took its value from its environment variable: settings
    read the variable themselves, so an error then names the variable, not the flag."""
    if flag is None:
        return True
    for param in ctx.command.params:
        if flag in getattr(param, "opts", ()) and param.name is not None:
            return not from_environment(ctx, param.name)
    return True


def build_settings(ctx: typer.Context, flags: dict[str, Any] | None = None) -> Settings:
    """Resolve settings once: flags > environment > TOML file > defaults; set up logging."""
    opts = state(ctx)
    all_flags = {
        key: value
        for key, value in (flags or {}).items()
        if _from_command_line(ctx, SPEC_BY_KEY[key].flag if key in SPEC_BY_KEY else None)
    }
    for name, key in _COMMON_FLAGS.items():
        if ctx.params.get(name) is not None and _from_command_line(ctx, SPEC_BY_KEY[key].flag):
            all_flags[key] = str(ctx.params[name])
    if opts.log_format:
        all_flags["log.format"] = opts.log_format
    settings = load_settings(flags=all_flags, env=dict(os.environ), config_path=opts.config)
    logger = setup_logging(settings.log_format, opts.verbosity)
    opts.resolved_format = current_format()
    if opts.resolved_format == "human" and opts.verbosity == 0 and err_console().is_terminal:
        logger.setLevel(logging.WARNING)  # README "Output": on a terminal, warnings and errors (-v: all)
    for warning in settings.warnings:
        logger.warning(warning, extra={"event": "config_warning"})
    return settings


def live_display(ctx: typer.Context) -> bool:
    """Whether to show live progress on stderr (README "Output"): a terminal with human logs and
    no -q. Then the log keeps to warnings and errors, unless -v asks for every event."""
    opts = state(ctx)
    live = err_console().is_terminal and opts.resolved_format == "human" and opts.verbosity >= 0
    if live and opts.verbosity == 0:
        logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)  # the live lines say the rest
    return live


def plural(n: int, noun: str) -> str:
    """'1 resource', '2 resources'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def wants_json(json_out: bool = False) -> bool:
    """The output policy (README "Output"): results as one JSON object on stdout with --json or
    when stdout is not a terminal (rich's TTY_COMPATIBLE=1 asks for the tables anyway)."""
    return json_out or not out_console().is_terminal


def error_format(opts: GlobalOptions | None) -> str:
    """human or json, for the final error lines: the log's format once logging is set up, else
    what the flag or PFSYNC_LOG_FORMAT asks for (auto: json off a terminal)."""
    if opts is not None and opts.resolved_format:
        return opts.resolved_format
    wanted = ((opts.log_format if opts else None) or os.environ.get("PFSYNC_LOG_FORMAT", "")).strip().lower()
    return wanted if wanted in ("human", "json") else "human" if sys.stderr.isatty() else "json"


def fail(exc: BaseException, verbosity: int = 0, opts: GlobalOptions | None = None) -> NoReturn:
    """Render an error on stderr (redacted) and exit with its code.

    Printed whatever -q says: a failure must never pass unseen. With JSON logs (and in auto mode
    off a terminal) it is one JSON object, so a log pipeline keeps the reason."""
    code = exit_code_for(exc)
    if isinstance(exc, httpx.HTTPError):  # escaped the layer that should have handled it
        exc = protocol_error(exc)
        code = exit_code_for(exc)
    if isinstance(exc, PfsyncError):
        message, hint = exc.message, exc.hint
    elif isinstance(exc, KeyboardInterrupt):
        message, hint = "interrupted", None
    else:
        message = f"unexpected error: {exc.__class__.__name__}: {exc}"
        hint = "this is a bug: please report it with the traceback" if verbosity > 0 else None
    show_trace = verbosity > 1 if isinstance(exc, PfsyncError) else verbosity > 0
    trace = redact("".join(traceback.format_exception(exc))) if show_trace else None
    report_error(message, hint, code, error_type=exc.__class__.__name__, trace=trace,
                 fmt=error_format(opts))  # fmt: skip
    raise typer.Exit(code)


_URL = re.compile(r"https?://[^\s)\]>\"']+")
LONG_URL = 100


def shorten_urls(text: str, limit: int = LONG_URL) -> str:
    """Long URLs (a kick-off URL with its _type list runs to hundreds of characters) cut down to
    their origin and last path segment, so the reason around them stays readable."""

    def short(match: re.Match[str]) -> str:
        url = match.group(0)
        if len(url) <= limit:
            return url
        parts = urlsplit(url)
        last = parts.path.rstrip("/").rsplit("/", 1)[-1]
        return f"{parts.scheme}://{parts.netloc}/…/{last}" + ("?…" if parts.query else "")

    return _URL.sub(short, text)


# When an error brings no hint of its own: what to do about its exit code (README "Exit codes").
DEFAULT_HINTS: dict[int, str] = {
    ExitCode.UNEXPECTED: "run again with -v to see where it happened, and please report it",
    ExitCode.USAGE: "see pfsync --help and the command's --help",
    ExitCode.CONFIG: "fix the setting named above (README: Configuration); retrying will not help",
    ExitCode.AUTH: "check the credentials and the app's authorisation: pfsync auth test shows each step",
    ExitCode.EXPORT_FAILED: "the source's export failed: retry later, and tell the EHR if it persists",
    ExitCode.PARTIAL: "the quarantine file in the state directory has each resource's reason; fix, then pfsync load it",
    ExitCode.STATE: "inspect the state directory (PFSYNC_STATE_DIR): it is never overwritten silently",
    ExitCode.LOCKED: "another run is working: nothing to do",
    ExitCode.UNHEALTHY: "pfsync status shows each source's reasons",
    ExitCode.VERIFY_MISMATCH: "run pfsync verify --fix --dry-run to see the repairs",
    ExitCode.TEMPORARY: "the next scheduled run tries again; nothing was lost",
    ExitCode.INTERRUPTED: "progress is saved: the next run resumes",
}


def report_error(
    message: str,
    hint: str | None,
    code: int,
    *,
    error_type: str | None = None,
    trace: str | None = None,
    fmt: str | None = None,
    source: str | None = None,
) -> None:
    """One `error:`/`hint:` pair on stderr (or one JSON object with event "error"), redacted."""
    fmt = fmt or error_format(None)
    hint = hint or DEFAULT_HINTS.get(code)
    if fmt == "json":
        doc: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "level": "error",
            "logger": "pfsync",
            "event": "error",
            "message": shorten_urls(redact(message)),
            "hint": redact(hint) if hint else None,
            "exitCode": code,
        }
        if source is not None:
            doc["source"] = source
        if error_type is not None:
            doc["errorType"] = error_type
        if trace:
            doc["exception"] = trace
        sys.stderr.write(orjson.dumps(doc).decode() + "\n")
        sys.stderr.flush()
        return
    console = err_console()
    prefix = f"{source}: " if source else ""
    text = shorten_urls(redact(message))
    console.print(f"error: {prefix}{text}", style="bold red", markup=False, highlight=False)
    if hint:
        console.print(f"hint: {redact(hint)}", style="yellow", markup=False, highlight=False)
    if trace:
        console.print(trace, markup=False, highlight=False)


@contextmanager
def errors_handled(ctx: typer.Context) -> Iterator[None]:
    """Map any exception raised inside to a clean message and a stable exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except (PfsyncError, KeyboardInterrupt) as exc:
        fail(exc, state(ctx).verbosity, state(ctx))
    except Exception as exc:
        logging.getLogger("pfsync").debug(
            "unexpected error", exc_info=True, extra={"event": "unexpected_error"}
        )
        fail(exc, state(ctx).verbosity, state(ctx))


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
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print the result as one JSON object on stdout (the default off a terminal)."
    ),
]
SourceUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--source-url",
        envvar="PF_FHIR_BASE_URL",
        show_envvar=True,
        help="FHIR base URL of the EHR (one source; overrides PF_FHIR_BASE_URL).",
    ),
]
MedplumUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--medplum-url", envvar="MEDPLUM_BASE_URL", show_envvar=True, help="Medplum server root URL."
    ),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="PFSYNC_STATE_DIR",
        show_envvar=True,
        help="Directory of checkpoints, id maps, exports, quarantine and retry queue "
        f"[default: {SPEC_BY_KEY['state.dir'].default}].",
    ),
]
