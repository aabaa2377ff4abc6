"""`pfsync load`: replay NDJSON files (an export directory, any NDJSON, a quarantine file) into Medplum."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import SourceOpt, not_implemented


@app.command("load")
def load(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="NDJSON files (.ndjson, .ndjson.gz) or directories.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; write nothing.")
    ] = False,
    async_batch: Annotated[
        bool,
        typer.Option(
            "--async-batch",
            envvar="PFSYNC_ASYNC_BATCH",
            show_envvar=True,
            help="Large Bundles, Prefer: respond-async.",
        ),
    ] = False,
    source: SourceOpt = None,
) -> None:
    """Upsert NDJSON into Medplum: one resource per source id, references rewritten to Medplum ids.

    Examples:

      pfsync load exports/2026-11-25/

      pfsync load Patient.ndjson.gz --dry-run

      pfsync load .pfsync/default/quarantine.ndjson
    """
    not_implemented(ctx, "load")
