"""`pfsync sync` (the scheduled job) and `pfsync status` (what the last runs did)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import JsonOpt, SourceOpt, not_implemented

MetricsOpt = Annotated[
    Path | None,
    typer.Option(
        "--metrics",
        envvar="PFSYNC_METRICS_FILE",
        show_envvar=True,
        help="Write Prometheus text metrics to FILE.",
    ),
]


@app.command("sync")
def sync(
    ctx: typer.Context,
    source: SourceOpt = None,
    every: Annotated[
        str | None,
        typer.Option("--every", help="Run forever at this interval (e.g. 24h), like the seed design."),
    ] = None,
    shard: Annotated[
        str | None, typer.Option("--shard", help="I/N: only sources whose hash falls in shard I.")
    ] = None,
    metrics: MetricsOpt = None,
) -> None:
    """Export what changed since the last checkpoint, load it, and only then advance the checkpoint.

    Examples:

      pfsync sync

      pfsync sync --source practice-a --metrics /var/lib/node_exporter/pfsync.prom

      pfsync sync --every 24h
    """
    not_implemented(ctx, "sync")


@app.command("status")
def status(
    ctx: typer.Context, source: SourceOpt = None, json_out: JsonOpt = False, metrics: MetricsOpt = None
) -> None:
    """Per source: last success, checkpoint, in-flight export, last counts, queues, lock, health.

    Exits non-zero when a source is unhealthy, so it can serve as a probe.

    Examples:

      pfsync status

      pfsync status --json
    """
    not_implemented(ctx, "status")
