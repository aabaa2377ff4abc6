"""One Bulk Data export from kick-off to files on disk: `run_export`, used by `pfsync export` and sync.

The export directory is resumable at every step (pfsync.source.exportjob): job.json is saved before the
first poll, each file is recorded once it has landed, and a rerun continues the saved job (files
already complete, verified by sha256, are not downloaded again; a finished job is replayed only
when every file still matches). Only a job the server has
forgotten (404/410) leads to a new kick-off. After every file is safely on disk the job is
DELETEd on the server (docs/bulk-data.md "Status polling": not before, keep it for recovery).

This module owns the run: which job to continue or kick off, the types the token allows, the
clean-up and the result. Polling and downloading the job's files, and their threads, are
pfsync.source.collect's. One export per group: call run_export once per ExportRequest
(`pfsync.source.bulk.requests_for`), each with its own `out_dir`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from pfsync.core.errors import ExportError, UsageError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.redact import redact
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import Clock, RetryPolicy, SystemClock
from pfsync.source.bulk import (
    ExportRequest,
    JobExpired,
    build_kickoff,
    export_id,
    kickoff,
    narrow_to_granted,
)
from pfsync.source.collect import ExportRun
from pfsync.source.exportjob import ExportJob, LandedFile, cancel_export, without_query
from pfsync.source.manifest import Issue

log = logging.getLogger("pfsync.export")
_KIND_ORDER = {"output": 0, "deleted": 1, "error": 2}

__all__ = ["ExportRequest", "ExportResult", "LandedFile", "cancel_export", "run_export"]


@dataclass(frozen=True)
class ExportResult:
    """What an export left in `out_dir`. `transaction_time` is the next `_since` (docs/bulk-data.md)."""

    transaction_time: str
    files: tuple[LandedFile, ...]  # kind "output"
    errors: tuple[LandedFile, ...]  # kind "error" (OperationOutcome NDJSON)
    deleted_files: tuple[LandedFile, ...]  # kind "deleted" (Bundles of DELETE requests)
    status_url: str
    export_id: str
    out_dir: Path
    request: ExportRequest
    issues: tuple[Issue, ...] = ()  # from the error files; only warning/information ones here
    problems: tuple[str, ...] = ()  # validation findings: bad lines, count mismatches, odd types
    warnings: tuple[str, ...] = ()  # skipped types, ungranted scopes, a failed clean-up DELETE
    resumed: bool = False
    deleted_on_server: bool = False

    @property
    def lines(self) -> int:
        return sum(f.lines for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in (*self.files, *self.deleted_files, *self.errors))


def _order(landed: LandedFile) -> tuple[int, str, int]:
    n = landed.path.name.rsplit(".", 2)
    return _KIND_ORDER[landed.kind], landed.type, int(n[1]) if len(n) == 3 and n[1].isdigit() else 0


def run_export(
    source: SourceSettings,
    settings: ExportSettings,
    client: httpx.Client,
    auth: httpx.Auth | None,
    *,
    out_dir: Path,
    request: ExportRequest,
    clock: Clock | None = None,
    events: EventSink | None = None,
    on_file: Callable[[LandedFile], None] | None = None,
    stop: threading.Event | None = None,
    granted_types: Sequence[str] | None = None,
    policy: RetryPolicy | None = None,
    unsupported_types: Sequence[str] = (),
) -> ExportResult:
    """Run (or resume) the export `request` of `source` into `out_dir`; see the module docstring.

    `on_file` gets every "output" and "deleted" file (never "error" ones, which are parsed here),
    including files a previous run already landed: a caller that crashed before loading them
    sees them again. `granted_types`: the types the token's scope allows (None: don't check);
    `unsupported_types`: those left out of the token request because the server does not have them
    (pfsync.source.auth.SourceAuthenticator.unsupported_types), reported as such rather than as not granted.
    Raises ExportError (failed export, fatal error issues, deadline), AuthError (refused, or a
    type not granted with export.strict_scopes), TemporaryError (past retries),
    InterruptedRunError (`stop` set). In every case the job stays saved and a rerun resumes it.
    """
    run = _Run(source, settings, client, auth, out_dir, clock or SystemClock(), events or NullSink(),
               on_file, stop, policy or RetryPolicy())  # fmt: skip
    return run.execute(request, granted_types, unsupported_types)


class _Run(ExportRun):
    """One run_export call: resume or kick off, collect (pfsync.source.collect), clean up, result."""

    def execute(
        self, request: ExportRequest, granted_types: Sequence[str] | None, unsupported: Sequence[str] = ()
    ) -> ExportResult:
        request = self._granted(request, granted_types, unsupported)
        job = self.dir.load_job()
        if job is not None and job.request != request:
            if job.state in ("kicked_off", "downloaded"):
                raise UsageError(
                    f"{self.dir.path} holds another export in progress ({redact(job.status_url)})",
                    hint="use another --out directory, or cancel that export with --cancel",
                )
            job = None  # a finished export of another request: replaced by this one
        elif job is not None and job.state in ("failed", "cancelled"):
            job = None
        if job is not None and job.state in ("downloaded", "complete"):
            damaged = [name for name in sorted(self.dir.manifest.files) if self.dir.complete(name) is None]
            if not damaged:
                return self._finish(job, resumed=True, replay=True)
            # Landed files are fsynced, so only something outside pfsync changes them; handing them on
            # would load less than was exported (docs/export-decisions.md "Landing files durably").
            self.warn(f"{', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''} no longer match "
                      "what was downloaded (missing, or another size or sha256): collecting the export again")  # fmt: skip
            job = self.dir.set_state(job, "kicked_off")
        resumed = job is not None
        restarted = False
        while True:
            self.dir.clean_parts()
            if job is None:
                if self.dir.manifest.files:
                    self.dir.discard()
                job = self._kickoff(request)
            else:
                self.events.emit("kickoff", exportId=export_id(job.status_url), resumed=True,
                                 statusUrl=without_query(job.status_url))  # fmt: skip
            try:
                job = self.collect(job)
            except JobExpired as exc:
                # Files that answer 410 while the status URL still works: the job is of no use, but
                # it is DELETEd so the server can free it (a gone job answers 404, which is fine).
                if exc.files_only:
                    self.cleanup(job)
                self.dir.set_state(job, "failed")
                if restarted:
                    raise ExportError(
                        f"{exc}; a new export expired as well", hint="try again later"
                    ) from None
                self.warn(f"{exc}: starting a new export")
                job, restarted = None, True
                continue
            return self._finish(job, resumed=resumed, replay=False)

    def _granted(
        self, request: ExportRequest, granted_types: Sequence[str] | None, unsupported: Sequence[str]
    ) -> ExportRequest:
        kept, lacking, refused = narrow_to_granted(
            request, granted_types, unsupported, self.settings.strict_scopes
        )
        if lacking:  # logged by the authenticator when it dropped them: only in the result here
            self.warnings.append(lacking + ": skipping them")
        if refused:
            self.warn(refused + ": skipping them")
        return kept

    def _kickoff(self, request: ExportRequest) -> ExportJob:
        _, url, _ = build_kickoff(self.source.base_url, request)
        status_url = kickoff(self.client, self.origins.auth_for(url, self.auth), self.source.base_url, request,
                             policy=self.policy, clock=self.clock, stop=self.stop,
                             deadline_at=self.deadline_at)  # fmt: skip
        # Saved before the first poll: a run killed from here on resumes this job (docs/bulk-data.md).
        job = self.dir.save_job(ExportJob(status_url, request, self.source.name, self.source.base_url,
                                          self.clock.now()))  # fmt: skip
        self.events.emit("kickoff", exportId=export_id(status_url), url=without_query(url), level=request.level,
                         group=request.group_id, types=list(request.types), since=request.since,
                         resumed=False, statusUrl=without_query(status_url))  # fmt: skip
        return job

    def _finish(self, job: ExportJob, *, resumed: bool, replay: bool) -> ExportResult:
        """Clean up on the server and build the result. `replay`: the files landed in an earlier
        run, so they are handed to `on_file` again (that run may have died before loading them)."""
        if replay and self.on_file is not None:
            for landed in sorted(self.dir.manifest.files.values(), key=_order):
                if landed.kind != "error":
                    self.on_file(landed)
        deleted = False
        if job.state == "downloaded":
            deleted = self.cleanup(job)
            job = self.dir.set_state(job, "complete")
        manifest = self.dir.manifest
        files = sorted(manifest.files.values(), key=_order)
        result = ExportResult(
            transaction_time=job.transaction_time or manifest.transaction_time or "",
            files=tuple(f for f in files if f.kind == "output"),
            errors=tuple(f for f in files if f.kind == "error"),
            deleted_files=tuple(f for f in files if f.kind == "deleted"),
            status_url=job.status_url,
            export_id=export_id(job.status_url),
            out_dir=self.dir.path,
            request=job.request,
            issues=tuple(manifest.issues),
            problems=tuple(manifest.problems),
            warnings=tuple(dict.fromkeys([*manifest.warnings, *self.warnings])),
            resumed=resumed,
            deleted_on_server=deleted,
        )
        self.events.emit("export_complete", exportId=result.export_id, transactionTime=result.transaction_time,
                         files=len(result.files), deletedFiles=len(result.deleted_files),
                         errorFiles=len(result.errors), lines=result.lines, bytes=result.bytes,
                         problems=len(result.problems), resumed=resumed)  # fmt: skip
        return result
