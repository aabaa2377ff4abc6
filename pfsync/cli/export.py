"""`pfsync export`: backfills and audits into a directory of NDJSON that `pfsync load` reads."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from pfsync.cli.app import app
from pfsync.cli.common import (
    JsonOpt,
    SourceOpt,
    SourceUrlOpt,
    build_settings,
    err_console,
    live_display,
    out_console,
    result_table,
    run,
    wants_json,
)
from pfsync.core.errors import UsageError
from pfsync.core.events import EventSink, FanoutSink
from pfsync.core.log import LogSink
from pfsync.sync.schedule import stop_on_signals


def parse_since(value: str) -> str:
    """A FHIR instant (UTC, `Z`) from an ISO date or date-time; a date means its midnight UTC."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageError(
            f"--since {value!r} is not an ISO date or date-time (e.g. 2026-01-01T00:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when > datetime.now(UTC):
        raise UsageError(f"--since {value!r} is in the future")
    text = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{when.microsecond // 1000:03d}" if when.microsecond else "") + "Z"


def _short_id(detail: dict[str, Any]) -> str:
    """An export id as a progress line shows it: its first 8 characters (a UUID left the line no
    room on an 80-column terminal; the result table names it whole)."""
    return str(detail.get("exportId") or "")[:8]


class ProgressSink:
    """Export events as a rich progress display: polling state, each file's bytes and rate, totals."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.status: TaskID | None = None
        self.total: TaskID | None = None
        self.files: dict[str, TaskID] = {}
        self.done_bytes = 0
        self._lock = threading.Lock()

    def emit(self, event: str, /, **d: Any) -> None:
        with self._lock:
            p = self.progress
            if event == "kickoff":
                text = f"export {_short_id(d)}: " + ("resumed" if d.get("resumed") else "kicked off")
                self.status = p.add_task(text, total=None)
                self.total = p.add_task("total", total=None)
            elif event == "status_progress" and self.status is not None:
                p.update(self.status, description=f"export {_short_id(d)}: waiting ({d.get('progress') or 'no progress reported'}), next poll in {d.get('retryIn')}s")  # fmt: skip
            elif event == "status_error" and self.status is not None:
                p.update(
                    self.status,
                    description=f"export {_short_id(d)}: server said {d.get('status')}, retrying",
                )
            elif event == "status_complete" and self.status is not None:
                p.update(self.status, description=f"export {_short_id(d)}: complete at {d['transactionTime']}",
                         total=1, completed=1)  # fmt: skip
            elif event == "download_request":
                self.files[d["name"]] = p.add_task(d["name"], total=None)
            elif event == "download_progress" and d["name"] in self.files:
                p.update(self.files[d["name"]], completed=d["bytes"])
            elif event == "download_complete" and d["name"] in self.files:
                task = self.files.pop(d["name"])
                p.update(
                    task,
                    total=d["bytes"],
                    completed=d["bytes"],
                    description=f"{d['name']} ({d['lines']} lines)",
                )
                self.done_bytes += d["bytes"]
                if self.total is not None:
                    p.update(self.total, completed=self.done_bytes)
            elif event == "download_error" and d["name"] in self.files:
                p.update(
                    self.files[d["name"]], description=f"{d['name']} (retrying: {str(d.get('message'))[:40]})"
                )


@contextmanager
def _sink(live: bool) -> Iterator[EventSink]:
    """Events to the log; on a terminal also to a live display (the log then keeps to problems)."""
    log_sink = LogSink(quiet_events=frozenset({"download_progress", "status_progress"}), info_as_debug=live)
    if not live:
        yield log_sink
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err_console(), transient=False) as progress:
        yield FanoutSink([ProgressSink(progress), log_sink])


@app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the NDJSON files and manifest.json.")
    ],
    since: Annotated[
        str | None, typer.Option("--since", help="Only resources changed since this instant.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Everything (the default; excludes --since).")] = False,
    types: Annotated[
        str | None,
        typer.Option("--types", envvar="PF_RESOURCE_TYPES", show_envvar=True, help="Comma-separated types."),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group", metavar="<id>", envvar="PFSYNC_GROUPS", show_envvar=True, help="Group id (repeat)."
        ),
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
    replace: Annotated[
        bool,
        typer.Option("--replace", help="Start a new export in a directory that holds a complete one."),
    ] = False,
    source: SourceOpt = None,
    json_out: JsonOpt = False,
    source_url: SourceUrlOpt = None,
) -> None:
    """Run a Bulk Data export into a directory (resumable; files checked and checksummed).

    The directory holds <Type>.<n>.ndjson, deleted.<n>.ndjson, error.<n>.ndjson, manifest.json and
    job.json: exactly what `pfsync load DIR` reads. With several groups, each group gets its own
    sub-directory DIR/<group-id>/. Run the same command again to resume an interrupted export; a
    directory that holds a complete export is refused (exit 2) unless --replace starts a new one.

    Examples:

    \b
      pfsync export --full --out exports/2026-11-25

    \b
      pfsync export --since 2026-01-01T00:00:00Z --types Patient,Condition --out backfill/
    """

    run(
        ctx,
        lambda: _export(
            ctx, _ExportArgs(out, since, full, types, group, level, cancel, replace, source, json_out)
        ),
    )


@dataclass(frozen=True)
class _ExportArgs:
    """What `pfsync export` was asked (its options, as typer parsed them)."""

    out: Path
    since: str | None
    full: bool
    types: str | None
    group: list[str] | None
    level: str | None
    cancel: bool
    replace: bool
    source: str | None
    json_out: bool


def _export(ctx: typer.Context, a: _ExportArgs) -> None:
    """The export command's work: settings, the source's auth, then each request's export (or cancel)."""
    from pfsync.net.http import RetryPolicy, make_client
    from pfsync.source.auth import source_auth
    from pfsync.source.bulk import requests_for
    from pfsync.source.export import cancel_export, run_export

    if a.since is not None and a.full:
        raise UsageError("--since and --full exclude each other")
    flags: dict[str, Any] = {"source.resource_types": a.types, "source.export_level": a.level,
                             "source.groups": tuple(a.group) if a.group else None}  # fmt: skip
    settings = build_settings(ctx, flags)
    src = settings.source(a.source)
    requests = requests_for(src, settings.export, since=parse_since(a.since) if a.since else None)
    dirs = [a.out if len(requests) == 1 else a.out / str(r.group_id) for r in requests]
    policy = RetryPolicy.from_settings(settings.http)
    if not a.cancel:
        _refuse_or_replace_complete(dirs, a.replace)
    with make_client(settings.http) as client:
        authenticator, auth = source_auth(
            src, client, http=settings.http, negotiate=not settings.export.strict_scopes
        )
        if a.cancel:
            cancelled = [str(d) for d in dirs if cancel_export(d, client, auth, policy=policy)]
            _print(
                {"cancelled": cancelled},
                a.json_out,
                "cancelled: " + (", ".join(cancelled) or "nothing to cancel"),
            )
            return
        authenticator.token()
        granted = authenticator.granted_types(src.resource_types)[0]
        results = []
        started = time.monotonic()
        with stop_on_signals(threading.Event()) as stop, _sink(live_display(ctx)) as sink:
            for req, out_dir in zip(requests, dirs, strict=True):
                results.append(run_export(src, settings.export, client, auth, out_dir=out_dir, request=req,
                                          events=sink, stop=stop, granted_types=granted, policy=policy,
                                          unsupported_types=authenticator.unsupported_types))  # fmt: skip
        _render(results, time.monotonic() - started, a.json_out)


def _refuse_or_replace_complete(dirs: list[Path], replace: bool) -> None:
    """A complete export is never returned again as if it were new (a daily export into one
    directory would stay stale forever): refuse it, or with --replace let a new export replace it."""
    from pfsync.source.exportjob import JOB_FILE, ExportDir

    for directory in dirs:
        if not (directory / JOB_FILE).is_file():
            continue
        export_dir = ExportDir(directory)
        job = export_dir.load_job()
        if job is None or job.state != "complete":
            continue  # in progress: the same command resumes it
        if replace:
            export_dir.set_state(job, "cancelled")  # the export starts afresh and replaces the files
            continue
        raise UsageError(
            f"{directory} already holds a complete export (transactionTime {job.transaction_time})",
            hint="pick a new --out directory for a new export (e.g. exports/$(date +%F)), or add --replace "
            "to export again into this one",
        )


def _print(doc: dict[str, Any], json_out: bool, text: str) -> None:
    if wants_json(json_out):
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        out_console().print(text, markup=False)


def _render(results: list[Any], seconds: float, json_out: bool) -> None:
    from pfsync.source.export import ExportResult

    docs: list[dict[str, Any]] = []
    for r in results:
        assert isinstance(r, ExportResult)
        docs.append({"outDir": str(r.out_dir), "exportId": r.export_id, "transactionTime": r.transaction_time,
                     "files": len(r.files), "deletedFiles": len(r.deleted_files), "errorFiles": len(r.errors),
                     "lines": r.lines, "bytes": r.bytes, "resumed": r.resumed, "problems": list(r.problems),
                     "warnings": list(r.warnings),
                     "types": {f.type: sum(g.lines for g in r.files if g.type == f.type) for f in r.files}})  # fmt: skip
    if wants_json(json_out):
        sys.stdout.write(
            orjson.dumps({"event": "export_summary", "seconds": round(seconds, 3), "exports": docs}).decode()
            + "\n"
        )
        return
    console = out_console()
    for doc in docs:
        title = f"{doc['outDir']}: export {doc['exportId']} at {doc['transactionTime']}"
        table = result_table(title, "type", [*doc["types"], "deleted files"])
        table.add_column("resources", justify="right", no_wrap=True)
        for rtype, lines in sorted(doc["types"].items()):
            table.add_row(rtype, str(lines))
        table.add_row("deleted files", str(doc["deletedFiles"]))
        console.print(table)
        for text in [*doc["warnings"], *doc["problems"]]:
            console.print(f"warning: {text}", style="yellow", markup=False)
