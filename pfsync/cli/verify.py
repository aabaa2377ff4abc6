"""`pfsync verify`: reconcile what Medplum holds against a source export."""

from __future__ import annotations

import sys
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
    fail,
    out_console,
    result_table,
    run,
    state,
    wants_json,
)
from pfsync.core.errors import UsageError, VerifyMismatchError
from pfsync.verify.report import CATEGORIES, VerifyReport

if TYPE_CHECKING:
    from pfsync.verify.report import VerifyOptions

_COLUMNS = ("source", "medplum", "present", "missing", "duplicated", "extra", "dangling", "drift")
_HEADERS = {"duplicated": "dupes"}  # the nine columns fit 80 with MedicationStatement's row


def _verify(
    ctx: typer.Context,
    from_dir: Path | None,
    export: bool,
    source_name: str | None,
    options: VerifyOptions,
) -> VerifyReport:
    from pfsync.medplum.client import MedplumClient
    from pfsync.net.http import make_client
    from pfsync.sync.state import last_local_success
    from pfsync.verify.exports import default_export, fresh_export
    from pfsync.verify.verifier import verify

    settings = build_settings(ctx)
    source = settings.source(source_name)
    if from_dir is not None and export:
        raise UsageError("--from and --export exclude each other")
    if options.fix_extras and not options.fix:
        raise UsageError("--fix-extras only goes with --fix", hint="pfsync verify --fix --fix-extras")
    if from_dir is not None:
        dirs = [from_dir]
    elif export:
        dirs = fresh_export(settings, source)
    else:
        dirs = default_export(settings, source, synced_at=last_local_success(settings, source.name))
    # The one Medplum client: the process's shared token, pacing, 429 waits (pfsync.medplum.client).
    http = make_client(settings.http, timeout=settings.http.load_timeout)
    with MedplumClient.connect(settings.medplum, http, settings=settings.http) as medplum:
        return verify(settings, source, medplum, dirs, options)


def render_table(report: VerifyReport, limit: int) -> None:
    console = out_console()
    final = report.final
    for title, rep in ((f"pfsync verify: {report.source}", report),) + (
        (("after --fix", final),) if report.after is not None else ()
    ):
        table = result_table(title, "type", [row.type for row in rep.types])
        for col in _COLUMNS:
            table.add_column(_HEADERS.get(col, col), justify="right", no_wrap=True)
        for row in (*rep.types, rep.total):
            values = [getattr(row, c) for c in _COLUMNS]
            if not rep.content_checked:
                values[-1] = "-"
            if not rep.extras_checked:
                values[5] = "-"
            table.add_row(row.type, *(str(v) for v in values), style="bold" if row.type == "total" else None)
        console.print(table)
    for category in CATEGORIES:
        found = report.of(category)
        if found:
            count = getattr(report.total, category)
            console.print(f"{category} ({count}{', first ' + str(limit) if count > len(found) else ''}):")
            for f in found[:limit]:
                console.print(f"  {f.label()}", markup=False, highlight=False)
    if report.actions:
        verb = "would" if report.dry_run else "did"
        console.print(f"--fix {verb}:")
        for a in report.actions:
            mark = (
                ""
                if report.dry_run or a.kind == "keep_extra"
                else (" ok" if a.done else f" FAILED: {a.error}")
            )
            ident = " ".join(x for x in (a.sid, a.mid) if x)
            console.print(f"  {a.kind} {a.type} {ident}: {a.reason}{mark}", markup=False, highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    console.print(
        f"quota used: {report.quota_used} points in {report.requests} requests"
        + (f" ({report.throttled} throttled)" if report.throttled else ""),
        markup=False,
    )


@app.command("verify")
def verify(
    ctx: typer.Context,
    from_dir: Annotated[
        Path | None, typer.Option("--from", help="Export directory to compare against.")
    ] = None,
    export: Annotated[
        bool, typer.Option("--export", help="Run a fresh full export and compare against it.")
    ] = False,
    content: Annotated[
        bool, typer.Option("--content", help="Also compare content (the loader's content hash).")
    ] = False,
    fix: Annotated[bool, typer.Option("--fix", help="Repair what can be repaired.")] = False,
    fix_extras: Annotated[
        bool, typer.Option("--fix-extras", help="With --fix: also delete extras (not in the source).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --fix: list actions only.")] = False,
    source: SourceOpt = None,
    json_out: JsonOpt = False,
    limit: Annotated[
        int, typer.Option("--limit", min=0, metavar="<int>", help="Ids listed per category in the table.")
    ] = 20,
    source_url: SourceUrlOpt = None,
    medplum_url: MedplumUrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Report missing, duplicated, extra and dangling resources between the source and Medplum.

    Without --from or --export, the newest finished export under the state directory is used if
    it is newer than the last sync; otherwise (right after `pfsync sync`, which deletes its
    exports) a fresh full export is run and kept for the next verify.
    Exit 0 only when nothing is missing, duplicated or dangling; else 11.

    Examples:

    \b
      pfsync verify --from exports/2026-11-25 --json

    \b
      pfsync verify --content --fix --dry-run
    """
    from pfsync.verify.report import VerifyOptions

    options = VerifyOptions(
        content=content,
        fix=fix or dry_run,  # --dry-run alone: list what --fix would do, write nothing
        fix_extras=fix_extras,
        dry_run=dry_run,
        limit=None if wants_json(json_out) else limit,
    )
    report = run(ctx, lambda: _verify(ctx, from_dir, export, source, options))
    _show(ctx, report, json_out, limit)


def _show(ctx: typer.Context, report: VerifyReport, json_out: bool, limit: int) -> None:
    """The report as JSON or a table; a mismatch then ends the command (exit 11)."""
    if wants_json(json_out):
        sys.stdout.write(orjson.dumps(report.to_json()).decode() + "\n")
        sys.stdout.flush()
    else:
        render_table(report, limit)
    if not report.ok:
        t = report.final.total
        fail(
            VerifyMismatchError(
                f"Medplum does not match the source: {t.missing} missing, {t.duplicated} duplicated, "
                f"{t.dangling} dangling",
                hint="run `pfsync verify --fix --dry-run` to see the repairs",
            ),
            state(ctx).verbosity,
            state(ctx),
        )
