"""`pfsync verify`: reconcile what Medplum holds against a source export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import JsonOpt, SourceOpt, not_implemented


@app.command("verify")
def verify(
    ctx: typer.Context,
    from_dir: Annotated[
        Path | None, typer.Option("--from", help="Export directory to compare against.")
    ] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Repair what can be repaired.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --fix: list actions only.")] = False,
    source: SourceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Report missing, duplicated, extra and dangling resources between the source and Medplum.

    Examples:

      pfsync verify --from exports/2026-11-25 --json
    """
    not_implemented(ctx, "verify")
