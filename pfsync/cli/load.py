"""`pfsync load`: replay NDJSON files (an export directory, any NDJSON, a quarantine file) into Medplum.

A source is needed only for the identifier namespace, meta.source and attachments: when none is
configured the source is named "default" with the default identifier systems and no base URL
(meta.source becomes `urn:pfsync:source:default`), so a pure replay does not need PF_FHIR_BASE_URL.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand

from pfsync.cli.app import app
from pfsync.cli.common import (
    JsonOpt,
    MedplumUrlOpt,
    SourceOpt,
    StateDirOpt,
    build_settings,
    err_console,
    live_display,
    out_console,
    plural,
    result_table,
    run,
    wants_json,
)
from pfsync.core.counts import COUNT_KEYS
from pfsync.core.errors import PartialLoadError, TemporaryError, UsageError
from pfsync.core.events import EventSink, FanoutSink
from pfsync.core.log import LogSink
from pfsync.core.ndjson import iter_paths, open_binary
from pfsync.core.settings import Settings, SourceSettings, require
from pfsync.core.statedir import QUARANTINE_FILE, source_dir
from pfsync.load.loader import Loader, LoadResult, load
from pfsync.load.quarantine import is_wrapped
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import make_client
from pfsync.source.exportjob import MANIFEST_FILE, changed_files
from pfsync.sync.schedule import stop_on_signals

COLUMNS = COUNT_KEYS
_HEADERS = {"retry_queued": "queued"}  # as in pfsync sync's table


class LoadProgress:
    """Loader events as a rich display: resources per second, per type, and quota remaining."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("loading", total=None)
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def emit(self, event: str, /, **d: Any) -> None:
        with self._lock:
            if event == "load_file_start":
                self.progress.update(self.task, description=f"reading {Path(str(d['file'])).name}")
            elif event == "load_file_complete":
                name = Path(str(d["file"])).name
                self.progress.update(
                    self.task, description=f"read {name}: {plural(d.get('resources', 0), 'resource')}"
                )
            elif event == "load_progress":
                rate = d["done"] / max(0.001, time.monotonic() - self.started)
                quota = d.get("quota_remaining")
                text = f"{d['type']}: {d['done']} resources, {rate:,.0f}/s" + (
                    f", quota left {quota:,}" if isinstance(quota, int) else ""
                )
                self.progress.update(self.task, description=text, completed=d["done"])


class QuarantineReasons:
    """Counts resources quarantined for their size: too large even for an async batch job."""

    def __init__(self) -> None:
        self.too_large = 0

    def emit(self, event: str, /, **d: Any) -> None:
        if event == "load_quarantined" and "too large" in str(d.get("reason", "")).lower():
            self.too_large += 1


def source_for_load(settings: Settings, name: str | None) -> SourceSettings:
    """The configured source, or a "default" one with identifier defaults for a pure replay."""
    if not settings.sources and name in (None, "default"):
        return SourceSettings(name="default", base_url="")
    return settings.source(name)


def _not_a_resource(head: bytes) -> bool:
    """True when every whole line in `head` is a JSON object without resourceType: JSON, but not
    FHIR. One bad line among resources is the loader's to quarantine; a pretty-printed document's
    first line does not parse, so the loader reads it as a document."""
    lines = [line for line in head.split(b"\n")[:-1] if line.strip()]  # the last one may be cut off
    if not lines:
        return False
    for line in lines:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(doc, dict) or "resourceType" in doc:
            return False
    return True


def check_inputs(paths: list[Path]) -> int:
    """Refuse what is not NDJSON before any request (a binary file would otherwise be quarantined
    line by line as "(unreadable)" resources, exit 6); say so when a file holds nothing. Returns
    how many files hold something."""
    files = list(iter_paths(paths))
    loadable = 0
    if not files:
        raise UsageError(f"no NDJSON files in {', '.join(str(p) for p in paths)}",
                         hint="pfsync load reads .ndjson, .ndjson.gz and .json files")  # fmt: skip
    for path in files:
        try:
            with open_binary(path) as fh:
                head = fh.read(4096)
        except (OSError, EOFError) as exc:
            raise UsageError(f"{path}: not readable ({exc.__class__.__name__}: {exc})") from None
        start = head.lstrip(b" \t\r\n\xef\xbb\xbf")
        if not start:
            logging.getLogger("pfsync.load").warning("%s is empty: nothing to load from it", path,
                                                     extra={"event": "load_empty_file"})  # fmt: skip
        elif not start.startswith(b"{") or b"\x00" in head:
            raise UsageError(
                f"{path}: not NDJSON (line 1 does not start a JSON object)",
                hint="pfsync load reads NDJSON: one FHIR resource (a JSON object) per line, optionally gzipped",
            )
        elif _not_a_resource(start) and not is_wrapped(path):
            raise UsageError(
                f"{path}: JSON, but not FHIR resources (no resourceType on its first lines)",
                hint="pfsync load reads FHIR resources (each with its resourceType), or a quarantine file",
            )
        else:
            loadable += 1
    return loadable


def warn_changed_exports(paths: list[Path]) -> None:
    """Say which files of an export directory no longer match its manifest.json (sizes only: free):
    what a missing or cut-short file held is not loaded. A warning, not a refusal: the files that
    are there load as they are, and the run goes on."""
    log = logging.getLogger("pfsync.load")
    for path in paths:
        for manifest in sorted(path.rglob(MANIFEST_FILE)) if path.is_dir() else ():
            for problem in changed_files(manifest.parent, sha256=False):
                log.warning("%s: %s since it was downloaded: what it lacks is not loaded", manifest.parent,
                            problem, extra={"event": "load_export_changed"})  # fmt: skip


# docs/medplum.md "Quota costs" (measured): about 100 points per write in direct mode (identity search
# included), about 140 per conditional PUT. A dry run sends only the searches, so its own quota
# says nothing about the load; this is what the writes it counted will cost.
QUOTA_PER_WRITE = {"direct": 100, "conditional": 140}


def quota_estimate(result: LoadResult, upsert_mode: str) -> int:
    writes = result.total("created") + result.total("updated") + result.total("deleted")
    return writes * QUOTA_PER_WRITE.get(upsert_mode, 100)


def render_summary(result: LoadResult, json_out: bool, upsert_mode: str = "direct") -> None:
    estimate = quota_estimate(result, upsert_mode) if result.dry_run else None
    if wants_json(json_out):
        doc = {"byType": result.by_type, "normalized": result.normalized, "quotaUsed": result.quota_used,
               "requests": result.requests, "durationSeconds": round(result.duration, 3), "dryRun": result.dry_run,
               "logicalReferences": result.logical_references,
               "logicalReferencesHeld": result.logical_references_held, "stats": result.stats}  # fmt: skip
        if estimate is not None:
            doc["quotaEstimate"] = estimate
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        return
    title = "pfsync load (dry run: nothing written)" if result.dry_run else "pfsync load"
    table = result_table(title, "type", result.by_type)
    fixed = any(result.normalized.values())  # a column of zeros would not fit 80 columns
    for col in (*COLUMNS, "normalized") if fixed else COLUMNS:
        table.add_column(_HEADERS.get(col, col), justify="right", no_wrap=True)
    for rtype, counts in result.by_type.items():
        norm = [str(result.normalized.get(rtype, 0))] if fixed else []
        table.add_row(rtype, *(str(counts.get(c, 0)) for c in COLUMNS), *norm)
    norm = [str(sum(result.normalized.values()))] if fixed else []
    table.add_row("total", *(str(result.total(c)) for c in COLUMNS), *norm, style="bold")
    console = out_console()
    console.print(table)
    if estimate is not None:
        per = QUOTA_PER_WRITE.get(upsert_mode, 100)
        cost = (f"the load would cost about {estimate:,} quota points (~{per} per write, {upsert_mode} mode); "
                f"this dry run: {plural(result.requests, 'read request')}, {result.quota_used:,} points")  # fmt: skip
    else:
        cost = f"{plural(result.requests, 'request')}, about {result.quota_used:,} quota points"
    console.print(f"{cost}, {result.duration:.1f} s", markup=False)
    if result.logical_references:
        n = result.logical_references
        held = result.logical_references_held
        console.print(
            f"{plural(n, 'resource')} of this load {'keeps' if n == 1 else 'keep'} logical references "
            "(their targets are not in Medplum yet; a later run upgrades them)"
            + (f"; {held:,} in the id map in all" if held > n else ""),
            markup=False,
        )


def outcome_error(
    result: LoadResult, quarantine: Path | None = None, too_large: int = 0
) -> TemporaryError | PartialLoadError | None:
    """Exit 75 when the retry queue is not empty, 6 when some resources were quarantined."""
    if result.retry_queued:
        n = result.retry_queued
        return TemporaryError(f"{plural(n, 'resource')} {'waits' if n == 1 else 'wait'} in the retry queue",
                              hint="run pfsync load or pfsync sync again later; they are retried first")  # fmt: skip
    if result.quarantined:
        n = result.quarantined
        where = str(quarantine) if quarantine else "quarantine.ndjson in the state directory"
        hint = (f"each reason is in {where}; fix the cause, then replay it: pfsync load {where}" if quarantine
                else f"see {where}; fix and replay it with pfsync load")  # fmt: skip
        if too_large:
            # docs/medplum.md "Size limits": what a synchronous Bundle refuses (over 1 MiB) is sent as an
            # async batch job by itself; this is over Medplum's maxBatchSize (50 MB by default) too.
            hint = (f"{plural(too_large, 'resource')} too large for Medplum even as an async batch job (its "
                    "maxBatchSize, 50 MB by default): shrink them (large attachments belong in Binary) or raise "
                    "the server's limit; " + hint)  # fmt: skip
        return PartialLoadError(
            f"{plural(n, 'resource')} {'was' if n == 1 else 'were'} quarantined", hint=hint
        )
    return None


class _LoadCommand(TyperCommand):
    """`pfsync load`'s help says PATH... where Typer prints "{PATH}..." and "<list[Path]>"."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        formatter.buffer[:] = [
            piece.replace("{PATH}...", "PATH...").replace("PATH <list[Path]>", "PATH...          ")
            for piece in formatter.buffer
        ]


@app.command("load", cls=_LoadCommand)
def load_command(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATH", help="NDJSON files (.ndjson, .ndjson.gz) or directories.", show_default=False
        ),
    ],
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
    json_out: JsonOpt = False,
    medplum_url: MedplumUrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Upsert NDJSON into Medplum: one resource per source id, references rewritten to Medplum ids.

    Exit codes: 0 all landed, 6 some quarantined, 75 some wait in the retry queue.

    Examples:

    \b
      pfsync load exports/2026-11-25/

    \b
      pfsync load Patient.ndjson.gz --dry-run

    \b
      pfsync load .pfsync/default/quarantine.ndjson
    """

    run(ctx, lambda: _load(ctx, _LoadArgs(paths, dry_run, async_batch, source, json_out)))


@dataclass(frozen=True)
class _LoadArgs:
    """What `pfsync load` was asked (its arguments, as typer parsed them)."""

    paths: list[Path]
    dry_run: bool
    async_batch: bool
    source: str | None
    json_out: bool


def _load(ctx: typer.Context, a: _LoadArgs) -> None:
    """The load command's work: settings, the clients, one Loader over every path, the summary."""
    settings = build_settings(ctx, {"load.async_batch": True if a.async_batch else None})
    if not check_inputs(a.paths):
        return  # every file is empty: each one was reported, nothing to send
    warn_changed_exports(a.paths)
    src = source_for_load(settings, a.source)
    mp = settings.medplum
    require(mp.client_id, "medplum.client_id", "pfsync load")
    require(mp.client_secret, "medplum.client_secret", "pfsync load")
    reasons = QuarantineReasons()
    with ExitStack() as stack:
        stop = stack.enter_context(stop_on_signals(threading.Event()))
        # The one Medplum client: the process's shared token, pacing, 429 waits (pfsync.medplum.client).
        http = make_client(settings.http, timeout=settings.http.load_timeout)
        medplum = stack.enter_context(MedplumClient.connect(mp, http, settings=settings.http, stop=stop))
        source_client = _source_client(settings, src, stack)
        events = FanoutSink(_sinks(ctx, stack, reasons))
        loader = stack.enter_context(
            Loader(
                src,
                settings.load,
                medplum,
                state_dir=settings.state_dir,
                source_client=source_client,
                http=settings.http,
                events=events,
                dry_run=a.dry_run,
                stop=stop,
            )
        )
        result = load(loader, a.paths)
    render_summary(result, a.json_out, settings.load.upsert_mode)
    error = outcome_error(
        result, source_dir(settings.state_dir, src.name) / QUARANTINE_FILE, reasons.too_large
    )
    if error is not None and not a.dry_run:
        raise error


def _source_client(settings: Settings, src: SourceSettings, stack: ExitStack) -> httpx.Client | None:
    """A client authenticated to the source (attachments, referenced resources), when one is configured."""
    if not (src.base_url and src.client_id):
        return None
    from pfsync.source.auth import source_auth

    plain = stack.enter_context(make_client(settings.http))
    _, bearer = source_auth(src, plain, http=settings.http)
    return stack.enter_context(make_client(settings.http, auth=bearer))


def _sinks(ctx: typer.Context, stack: ExitStack, reasons: QuarantineReasons) -> list[EventSink]:
    """The load's events to the log and `reasons`; on a terminal also to a live display."""
    live = live_display(ctx)
    sinks: list[EventSink] = [
        LogSink(quiet_events=frozenset({"load_progress", "load_file_start"}), info_as_debug=live),
        reasons,
    ]
    if live:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        progress = stack.enter_context(Progress(*columns, console=err_console(), transient=True))
        sinks.append(LoadProgress(progress))
    return sinks
