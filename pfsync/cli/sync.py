"""`pfsync sync` (the scheduled job) and `pfsync status` (what the last runs did)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer

from pfsync.cli.app import app
from pfsync.cli.common import (
    JsonOpt,
    MedplumUrlOpt,
    SourceOpt,
    SourceUrlOpt,
    StateDirOpt,
    build_settings,
    err_console,
    error_format,
    exit_with,
    live_display,
    out_console,
    plural,
    report_error,
    result_table,
    run,
    state,
    wants_json,
)
from pfsync.cli.progress import SyncProgress, make_progress
from pfsync.core.counts import COUNT_KEYS, CountKey
from pfsync.core.errors import ExitCode, UnhealthyError
from pfsync.core.events import EventSink, FanoutSink
from pfsync.core.settings import Settings, SourceSettings, parse_duration
from pfsync.core.statedir import QUARANTINE_FILE

if TYPE_CHECKING:
    from pfsync.sync.results import SourceResult, SyncResult
    from pfsync.sync.status import SourceStatus

QUIET_EVENTS = frozenset({"download_progress", "status_progress", "load_progress", "load_file_start"})

MetricsOpt = Annotated[
    Path | None,
    typer.Option(
        "--metrics",
        envvar="PFSYNC_METRICS_FILE",
        show_envvar=True,
        help="Write Prometheus text metrics to FILE.",
    ),
]

EveryOpt = Annotated[
    str | None,
    typer.Option(
        "--every",
        help="Run forever at this interval (e.g. 24h), like the Medplum Practice Fusion bot integration.",
    ),
]
DaemonOpt = Annotated[
    bool,
    typer.Option(
        "--daemon",
        help="Run forever at sync.interval_ms (PF_SYNC_INTERVAL_MS), like the Medplum Practice Fusion bot integration.",
    ),
]
RunOnStartupOpt = Annotated[
    bool | None,
    typer.Option(
        "--run-on-startup/--no-run-on-startup",
        help="With --every/--daemon: run at once instead of after one interval [default: PF_SYNC_RUN_ON_STARTUP].",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        envvar="PFSYNC_SHARD",
        show_envvar=True,
        help="I/N (0-based): only sources whose sha256(name) mod N is I (Kubernetes Indexed Jobs).",
    ),
]


def _status_tables(statuses: list[SourceStatus]) -> None:
    """One two-column table per source: ten columns side by side did not fit a terminal."""
    console = out_console()
    for s in statuses:
        written = sum(c.get("created", 0) + c.get("updated", 0) for c in s.counts.values())
        rows = {
            "healthy": "yes" if s.healthy else "NO: " + "; ".join(s.reasons),
            "last success": _age(s.last_success_age), "last attempt": _age(s.last_attempt_age),
            "checkpoint": s.transaction_time or "-",
            "last run": f"{s.last_outcome or '-'} ({plural(written, 'resource')} written)",
            "in flight": s.in_flight or "-", "quarantine": plural(s.quarantine_size, "resource"),
            "retry queue": plural(s.retry_queue_size, "resource"), "lock": s.lock_holder or "-",
        }  # fmt: skip
        table = result_table(f"pfsync status: {s.source}", "", rows)
        table.show_header = False
        table.add_column("", overflow="fold")
        for name, value in rows.items():
            table.add_row(name, value)
        console.print(table)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _problem_hint(settings: Settings, result: SourceResult) -> str | None:
    """What to do about a source's outcome: the error's own hint, else one for queues."""
    if result.hint:
        return result.hint
    if result.outcome == "partial":
        path = settings.state_dir / result.source / QUARANTINE_FILE
        return f"see {path} for each resource's reason; fix the cause, then replay it: pfsync load {path}"
    if result.exit_code == ExitCode.TEMPORARY:
        if any(c.get(CountKey.RETRY_QUEUED) for c in result.counts.values()):
            return "the next run retries them first and re-exports the same window"
        return (
            "the source or Medplum was unreachable or overloaded; the next run tries again (nothing was lost)"
        )
    return None


def report_outcomes(ctx: typer.Context, settings: Settings, results: Sequence[SourceResult]) -> None:
    """One error:/hint: pair per source that did not end ok (printed even with -q)."""
    fmt = error_format(state(ctx))
    for r in results:
        if r.exit_code != ExitCode.OK:
            report_error(
                r.error or r.outcome, _problem_hint(settings, r), r.exit_code, fmt=fmt, source=r.source
            )


def _write_metrics(settings: Settings, names: list[str], path: Path) -> None:
    from pfsync.sync.live import open_store
    from pfsync.sync.metrics import write_metrics
    from pfsync.sync.status import collect_status

    store, close = open_store(settings)
    try:
        write_metrics(path, collect_status(settings, store, names, time.time()))
    finally:
        close()


def _render_summary(result: SyncResult, json_out: bool) -> None:
    console = out_console()
    if wants_json(json_out):
        doc = {"event": "sync_summary", "exitCode": result.exit_code, "durationSeconds": round(result.duration, 3),
               "sources": [r.to_json() for r in result.results]}  # fmt: skip
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        sys.stdout.flush()
        return
    console.print(
        f"pfsync sync: exit {result.exit_code} in {result.duration:.1f} s", style="bold", markup=False
    )
    keys = COUNT_KEYS
    for r in result.results:
        # One heading line and one table per source: as columns, source and outcome left the
        # resource types five characters on an 80-column terminal.
        head = f"{r.source}: {r.outcome}, {r.duration:.1f} s, {r.quota_used:,} quota points"
        console.print(head + (f", {r.error}" if r.error else ""), markup=False)
        if not r.counts:
            continue
        table = result_table("", "type", r.counts)
        for key in keys:
            table.add_column(
                "queued" if key is CountKey.RETRY_QUEUED else str(key), justify="right", no_wrap=True
            )
        for rtype, c in sorted(r.counts.items()):
            table.add_row(rtype, *(str(c.get(k, 0)) for k in keys))
        console.print(table)


@app.command("sync")
def sync(
    ctx: typer.Context,
    source: SourceOpt = None,
    every: EveryOpt = None,
    daemon: DaemonOpt = False,
    run_on_startup: RunOnStartupOpt = None,
    shard: ShardOpt = None,
    json_out: JsonOpt = False,
    metrics: MetricsOpt = None,
    source_url: SourceUrlOpt = None,
    medplum_url: MedplumUrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Export what changed since the last checkpoint, load it, and only then advance the checkpoint.

    Exit code with several sources: the worst outcome, in this order: 130 interrupted, 3 config,
    4 auth, 7 state, 1 unexpected, 2 usage, 5 export failed, 75 temporary, 8 locked, 6 partial, 0 ok.

    Examples:

    \b
      pfsync sync

    \b
      pfsync sync --source practice-a --metrics /var/lib/node_exporter/pfsync.prom

    \b
      pfsync sync --every 24h

    \b
      pfsync sync --shard $JOB_COMPLETION_INDEX/4
    """
    settings = run(ctx, lambda: build_settings(ctx))
    from pfsync.sync.schedule import run_every, stop_on_signals
    from pfsync.sync.sources import select_sources

    sources = run(ctx, lambda: select_sources(settings, source, shard))
    stop = threading.Event()

    def once() -> int:
        return run(ctx, lambda: _sync_once(ctx, settings, sources, stop, json_out, metrics))

    with stop_on_signals(stop):
        if every is None and not daemon:
            exit_with(once())
        interval = (
            run(ctx, lambda: parse_duration(every, "--every")) if every else settings.sync.interval_ms / 1000
        )
        startup = settings.sync.run_on_startup if run_on_startup is None else run_on_startup
        exit_with(run_every(once, interval, run_on_startup=startup, stop=stop))


def _sync_once(
    ctx: typer.Context,
    settings: Settings,
    sources: list[SourceSettings],
    stop: threading.Event,
    json_out: bool,
    metrics: Path | None,
) -> int:
    """One run of `pfsync sync` over `sources`: its result shown, outcomes reported, metrics written."""
    from pfsync.core.log import LogSink
    from pfsync.sync.live import live_engines, open_store
    from pfsync.sync.run import sync_all

    # On a terminal: one live line per source, and the log keeps only warnings and errors
    # (-v shows every event). Elsewhere every event is a log line (JSON off a terminal).
    live = live_display(ctx)
    with ExitStack() as stack:
        sinks: list[EventSink] = [LogSink(quiet_events=QUIET_EVENTS, info_as_debug=live)]
        if live:
            sinks.append(SyncProgress(stack.enter_context(make_progress(err_console()))))
        events = FanoutSink(sinks)
        store, close = open_store(settings)
        stack.callback(close)
        result = sync_all(settings, sources, store, live_engines(settings, events=events), stop=stop,
                          events=events)  # fmt: skip
    _render_summary(result, json_out)
    report_outcomes(ctx, settings, result.results)
    if metrics is not None:
        _write_metrics(settings, [s.name for s in sources], metrics)
    return result.exit_code


@app.command("status")
def status(
    ctx: typer.Context,
    source: SourceOpt = None,
    json_out: JsonOpt = False,
    metrics: MetricsOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Per source: last success, checkpoint, in-flight export, last counts, queues, lock, health.

    Exits 9 when a source is unhealthy (disabled, last run failed, never ran, or last success
    older than sync.stale_after), so it can serve as a probe.

    Examples:

    \b
      pfsync status

    \b
      pfsync status --json
    """
    settings = run(ctx, lambda: build_settings(ctx))

    def go() -> int:
        from pfsync.sync.live import open_store
        from pfsync.sync.metrics import write_metrics
        from pfsync.sync.sources import select_sources
        from pfsync.sync.status import collect_status

        names = [s.name for s in select_sources(settings, source)]
        store, close = open_store(settings)
        try:
            statuses = collect_status(settings, store, names, time.time())
        finally:
            close()
        if metrics is not None:
            write_metrics(metrics, statuses)
        if wants_json(json_out):
            doc = {"healthy": all(s.healthy for s in statuses), "sources": [s.to_json() for s in statuses]}
            sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        else:
            _status_tables(statuses)
        unhealthy = [s for s in statuses if not s.healthy]
        if unhealthy:
            raise UnhealthyError(f"unhealthy: {', '.join(s.source for s in unhealthy)}",
                                 hint="; ".join(f"{s.source}: {', '.join(s.reasons)}" for s in unhealthy))  # fmt: skip
        return 0

    exit_with(run(ctx, go))
