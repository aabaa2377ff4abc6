"""One Bulk Data export from kick-off to files on disk: `run_export`, used by `pfsync export` and sync.

The export directory is resumable at every step (pfsync.source.exportjob): job.json is saved before the
first poll, each file is recorded once it has landed, and a rerun continues the saved job (files
already complete, verified by sha256, are not downloaded again). Only a job the server has
forgotten (404/410) leads to a new kick-off. After every file is safely on disk the job is
DELETEd on the server (docs/bulk-data.md "Status polling": not before, keep it for recovery).

Threads: downloads run in a pool of `export.parallel_downloads` workers; everything else (polling,
manifest.json, `on_file` callbacks, events other than download_*) happens on the calling thread,
so `on_file` is called serially, in the caller's thread, as soon as each file has landed, while
the other downloads continue (download and load overlap). One export per group: call run_export
once per ExportRequest (`pfsync.source.bulk.requests_for`), each with its own `out_dir`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from pfsync.core.errors import AuthError, ExportError, InterruptedRunError, PfsyncError, UsageError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.ndjson import Record, iter_file
from pfsync.core.redact import redact
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import Clock, RetryPolicy, SystemClock
from pfsync.source.bulk import (
    ExportRequest,
    Issue,
    JobExpired,
    ManifestFile,
    Origins,
    Poller,
    build_kickoff,
    delete_job,
    export_id,
    group_exists,
    issues_of,
    kickoff,
    unknown_group,
)
from pfsync.source.download import Downloaded, Downloader
from pfsync.source.exportjob import ExportDir, ExportJob, LandedFile, file_name, without_query

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
) -> ExportResult:
    """Run (or resume) the export `request` of `source` into `out_dir`; see the module docstring.

    `on_file` gets every "output" and "deleted" file (never "error" ones, which are parsed here),
    including files a previous run already landed: a caller that crashed before loading them
    sees them again. `granted_types`: the types the token's scope allows (None: don't check).
    Raises ExportError (failed export, fatal error issues, deadline), AuthError (refused, or a
    type not granted with export.strict_scopes), TemporaryError (past retries),
    InterruptedRunError (`stop` set). In every case the job stays saved and a rerun resumes it.
    """
    run = _Run(source, settings, client, auth, out_dir, clock or SystemClock(), events or NullSink(),
               on_file, stop, policy or RetryPolicy())  # fmt: skip
    return run.execute(request, granted_types)


def cancel_export(
    out_dir: Path,
    client: httpx.Client,
    auth: httpx.Auth | None,
    *,
    policy: RetryPolicy | None = None,
    clock: Clock | None = None,
) -> bool:
    """`pfsync export --cancel`: DELETE the saved in-flight job. False when there is nothing to cancel."""
    export_dir = ExportDir(out_dir)
    job = export_dir.load_job()
    if job is None or job.state in ("complete", "cancelled", "failed"):
        return False
    origins = Origins(job.base_url)
    delete_job(client, origins.auth_for(job.status_url, auth), job.status_url,
               policy=policy or RetryPolicy(), clock=clock or SystemClock())  # fmt: skip
    export_dir.set_state(job, "cancelled")
    return True


class _Run:
    """The state of one run_export call."""

    def __init__(
        self,
        source: SourceSettings,
        settings: ExportSettings,
        client: httpx.Client,
        auth: httpx.Auth | None,
        out_dir: Path,
        clock: Clock,
        events: EventSink,
        on_file: Callable[[LandedFile], None] | None,
        stop: threading.Event | None,
        policy: RetryPolicy,
    ) -> None:
        self.source, self.settings, self.client, self.auth = source, settings, client, auth
        self.clock, self.events, self.on_file, self.stop, self.policy = clock, events, on_file, stop, policy
        self.dir = ExportDir(out_dir)
        self.origins = Origins(source.base_url, source.download_allowlist)
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def execute(self, request: ExportRequest, granted_types: Sequence[str] | None) -> ExportResult:
        request = self._granted(request, granted_types)
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
            return self._finish(job, resumed=True, replay=True)
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
                job = self._collect(job)
            except JobExpired as exc:
                # Files that answer 410 while the status URL still works: the job is of no use, but
                # it is DELETEd so the server can free it (a gone job answers 404, which is fine).
                if exc.files_only:
                    self._cleanup(job)
                self.dir.set_state(job, "failed")
                if restarted:
                    raise ExportError(
                        f"{exc}; a new export expired as well", hint="try again later"
                    ) from None
                self.warn(f"{exc}: starting a new export")
                job, restarted = None, True
                continue
            return self._finish(job, resumed=resumed, replay=False)

    def _granted(self, request: ExportRequest, granted_types: Sequence[str] | None) -> ExportRequest:
        if granted_types is None or not request.types:
            return request
        granted = set(granted_types)
        missing = [t for t in request.types if t not in granted]
        if not missing:
            return request
        text = f"the token's scope does not grant {', '.join(missing)}"
        kept = tuple(t for t in request.types if t in granted)
        if self.settings.strict_scopes or not kept:
            raise AuthError(
                text + ("" if kept else ": nothing left to export"),
                hint="ask the practice admin to authorise these types, or remove them from the resource types",
            )
        self.warn(text + ": skipping them")
        return replace(request, types=kept)

    def _kickoff(self, request: ExportRequest) -> ExportJob:
        _, url, _ = build_kickoff(self.source.base_url, request)
        status_url = kickoff(self.client, self.origins.auth_for(url, self.auth), self.source.base_url, request,
                             policy=self.policy, clock=self.clock, stop=self.stop)  # fmt: skip
        # Saved before the first poll: a run killed from here on resumes this job (docs/bulk-data.md).
        job = self.dir.save_job(ExportJob(status_url, request, self.source.name, self.source.base_url,
                                          self.clock.now()))  # fmt: skip
        self.events.emit("kickoff", exportId=export_id(status_url), url=without_query(url), level=request.level,
                         group=request.group_id, types=list(request.types), since=request.since,
                         resumed=False, statusUrl=without_query(status_url))  # fmt: skip
        return job

    def _collect(self, job: ExportJob) -> ExportJob:
        """Poll, then download every manifest file; returns the job in state "downloaded"."""
        eid = export_id(job.status_url)
        poller = Poller(self.client, self.origins.auth_for(job.status_url, self.auth), self.settings,
                        self.policy, self.clock, self.events, self.stop)  # fmt: skip
        deadline_at = self.clock.now() + self.settings.deadline
        halt = threading.Event()
        numbers: Counter[tuple[str, str]] = Counter()
        pending: dict[Future[Downloaded], str] = {}
        issues: list[Issue] = []
        problems: list[str] = []
        pool = ThreadPoolExecutor(max_workers=self.settings.parallel_downloads, thread_name_prefix="download")
        try:
            page_url: str | None = job.status_url
            downloader: Downloader | None = None
            first = True
            while page_url is not None:
                manifest = poller.poll(page_url, deadline_at=deadline_at, started_at=job.kicked_off_at)
                if first:
                    first = False
                    self.dir.manifest.export_id = eid
                    self.dir.manifest.transaction_time = manifest.transaction_time
                    self.dir.manifest.request = without_query(manifest.request)
                    job = self.dir.save_job(replace(job, transaction_time=manifest.transaction_time))
                    if not manifest.files and manifest.next_url is None:
                        self._check_empty(job)
                    downloader = Downloader(self.client, self.auth, self.origins, self.dir, self.policy,
                                            self.clock, self.events, eid, manifest.requires_access_token,
                                            self.settings.max_line_bytes, halt,
                                            validate=self.settings.validate,
                                            max_file_bytes=self.settings.max_file_bytes,
                                            max_export_bytes=self.settings.max_export_bytes,
                                            deadline_at=deadline_at)  # fmt: skip
                self.events.emit("status_complete", exportId=eid, transactionTime=manifest.transaction_time,
                                 outputFiles=sum(f.kind == "output" for f in manifest.files),
                                 errorFiles=sum(f.kind == "error" for f in manifest.files),
                                 deletedFiles=sum(f.kind == "deleted" for f in manifest.files),
                                 more=manifest.next_url is not None)  # fmt: skip
                assert downloader is not None
                for entry in manifest.files:
                    name = self._name(entry, numbers, job.request)
                    if name is None:
                        continue
                    done = self.dir.complete(name)
                    if done is not None:
                        log.info("%s is already complete; not downloading it again", name)
                        self._landed(Downloaded(done), issues, problems, fresh=False)
                        continue
                    pending[pool.submit(downloader.download, entry, name)] = name
                self._drain(pending, issues, problems, halt, block=False)
                page_url = manifest.next_url
            while pending:
                self._drain(pending, issues, problems, halt, block=True)
        except BaseException:
            halt.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._keep_finished(pending)
            raise
        pool.shutdown(wait=True)
        self.dir.manifest.issues, self.dir.manifest.problems = issues, problems
        self.dir.manifest.warnings = self.warnings
        self.dir.save_manifest()  # also when the export failed: the saved manifest names its issues
        fatal = [i for i in issues if i.fatal]
        if fatal:
            self.dir.set_state(job, "failed")
            self._cleanup(job)
            texts = "; ".join(dict.fromkeys(i.text or i.code for i in fatal))
            raise ExportError(f"the export reported {len(fatal)} error(s): {texts[:1000]}",
                              hint="the files that did export are in the directory; the next run starts a new export")  # fmt: skip
        return self.dir.set_state(job, "downloaded")

    def _check_empty(self, job: ExportJob) -> None:
        """An empty manifest for a whole group (no `_since`) most likely means a wrong group id: the
        SMART reference server exports an unknown group as nothing (docs/export-decisions.md)."""
        request = job.request
        if request.group_id is None or request.since is not None:
            return
        base = self.source.base_url
        exists = group_exists(self.client, self.origins.auth_for(base, self.auth), base, request.group_id,
                              policy=self.policy, clock=self.clock)  # fmt: skip
        if exists is False:
            self._cleanup(job)
            self.dir.set_state(job, "failed")
            raise unknown_group(request.group_id, base, "the server exported nothing and has no such Group")
        self.warn(f"group {request.group_id!r} exported nothing: check that it is the intended group")

    def _keep_finished(self, pending: dict[Future[Downloaded], str]) -> None:
        """On the way out (stop, error): record the files that did land, so the next run skips them."""
        for future in pending:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.dir.record(future.result().landed)

    def _name(
        self, entry: ManifestFile, numbers: Counter[tuple[str, str]], request: ExportRequest
    ) -> str | None:
        if entry.kind == "output" and request.types and entry.type not in request.types:
            # docs/practice-fusion.md: manifests list types nobody asked for (Location); not downloaded.
            self.warn(f"the manifest lists {entry.type}, which was not requested: skipped")
            return None
        key = (entry.kind, entry.type if entry.kind == "output" else "")
        numbers[key] += 1
        return file_name(entry.kind, entry.type, numbers[key])

    def _drain(self, pending: dict[Future[Downloaded], str], issues: list[Issue], problems: list[str],
               halt: threading.Event, *, block: bool) -> None:  # fmt: skip
        """Handle finished downloads on this thread (block: until one finishes); watch for `stop`."""
        while pending:
            done, _ = wait_futures(list(pending), timeout=0.2 if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                del pending[future]
                try:
                    downloaded = future.result()
                except JobExpired as exc:
                    exc.files_only = True
                    raise
                self._landed(downloaded, issues, problems, fresh=True)
            if self.stop is not None and self.stop.is_set():
                halt.set()
                raise InterruptedRunError(
                    "export interrupted; complete files are kept and the next run resumes"
                )
            if done or not block:
                return

    def _landed(
        self, downloaded: Downloaded, issues: list[Issue], problems: list[str], *, fresh: bool
    ) -> None:
        landed = downloaded.landed
        if fresh:
            self.dir.record(landed)
            problems.extend(downloaded.problems)
        if landed.kind == "error":
            found = list(downloaded.issues) if fresh else _issues_from_file(landed.path)
            for issue in found:
                if not issue.fatal:
                    self.warn(f"the server reported ({issue.severity}): {issue.text or issue.code}")
            issues.extend(found)
        elif self.on_file is not None:
            self.on_file(landed)

    def _cleanup(self, job: ExportJob) -> bool:
        if not self.settings.delete_after_download:
            return False
        try:
            return delete_job(self.client, self.origins.auth_for(job.status_url, self.auth), job.status_url,
                              policy=self.policy, clock=self.clock)  # fmt: skip
        except PfsyncError as exc:
            self.warn(f"could not DELETE the finished export job: {exc}")
            return False

    def _finish(self, job: ExportJob, *, resumed: bool, replay: bool) -> ExportResult:
        """Clean up on the server and build the result. `replay`: the files landed in an earlier
        run, so they are handed to `on_file` again (that run may have died before loading them)."""
        if replay and self.on_file is not None:
            for landed in sorted(self.dir.manifest.files.values(), key=_order):
                if landed.kind != "error":
                    self.on_file(landed)
        deleted = False
        if job.state == "downloaded":
            deleted = self._cleanup(job)
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


def _issues_from_file(path: Path) -> list[Issue]:
    found: list[Issue] = []
    for item in iter_file(path):
        if isinstance(item, Record):
            found += issues_of(item.resource)
    return found
