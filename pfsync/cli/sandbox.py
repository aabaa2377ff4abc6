"""`pfsync sandbox`: start the local source and target sandboxes and print the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import not_implemented


@app.command("sandbox")
def sandbox(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option("--data", help="NDJSON directory to serve [default: generated].")
    ] = None,
    source_port: Annotated[int, typer.Option("--source-port", help="Port of the source sandbox.")] = 8710,
    target_port: Annotated[int, typer.Option("--target-port", help="Port of the target sandbox.")] = 8711,
    state: Annotated[
        Path | None, typer.Option("--state", help="Directory for the target's SQLite state.")
    ] = None,
) -> None:
    """Serve a Practice Fusion-like source and a Medplum-like target on 127.0.0.1 until stopped.

    Examples:

      pfsync sandbox

      pfsync sandbox --data ../shared/fixtures/synthea-small --state /tmp/pfsync-target
    """
    not_implemented(ctx, "sandbox")
