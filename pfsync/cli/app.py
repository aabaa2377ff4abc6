"""The Typer application and its global options (--config, -v, -q, --log-format, --version)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync import __version__
from pfsync.cli.common import GlobalOptions, from_environment

app = typer.Typer(
    name="pfsync",
    help=(
        "Keep a Medplum FHIR server in step with an EHR (Practice Fusion or any SMART Backend "
        "Services + Bulk Data server): export what changed, upsert it without duplicates, "
        "rewrite every reference to Medplum ids.\n\n"
        "Exit codes: 0 ok, 1 unexpected, 2 usage, 3 config, 4 auth, 5 export failed, 6 partial "
        "(some resources quarantined), 7 state, 8 locked, 9 unhealthy, 11 verify mismatch, "
        "75 temporary failure (retry later), 130 interrupted (resumable); 10 is retired."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # Typer's pretty tracebacks print locals, i.e. secrets
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pfsync {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="PFSYNC_CONFIG",
            show_envvar=True,
            help="TOML config file [default: ./pfsync.toml if present].",
        ),
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, show_default=False, help="More detail (-vv: debug).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            envvar="PFSYNC_LOG_FORMAT",
            show_envvar=True,
            help="human, json (one object per line, for cron and Kubernetes) or auto (human on a TTY).",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """pfsync: EHR (SMART Backend Services + FHIR Bulk Data) to Medplum, incrementally."""
    if from_environment(ctx, "log_format"):
        log_format = None  # settings read PFSYNC_LOG_FORMAT themselves, so an error names the variable
    ctx.obj = GlobalOptions(config=config, verbosity=-1 if quiet else verbose, log_format=log_format)
