"""`pfsync export`: backfills and audits into a directory of NDJSON that `pfsync load` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import SourceOpt, not_implemented


@app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the NDJSON files and manifest.json.")
    ],
    since: Annotated[
        str | None, typer.Option("--since", help="Only resources changed since this instant.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Everything, ignoring any checkpoint.")] = False,
    types: Annotated[
        str | None,
        typer.Option("--types", envvar="PF_RESOURCE_TYPES", show_envvar=True, help="Comma-separated types."),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", envvar="PFSYNC_GROUPS", show_envvar=True, help="Group id (repeat)."),
    ] = None,
    level: Annotated[
        str | None,
        typer.Option(
            "--level", envvar="PFSYNC_EXPORT_LEVEL", show_envvar=True, help="group, patient or system."
        ),
    ] = None,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="Cancel the saved in-flight export (DELETE).")
    ] = False,
    source: SourceOpt = None,
) -> None:
    """Run a Bulk Data export into a directory (resumable; files checked and checksummed).

    Examples:

      pfsync export --full --out exports/2026-11-25

      pfsync export --since 2026-01-01T00:00:00Z --types Patient,Condition --out backfill/
    """
    not_implemented(ctx, "export")
