"""Collecting one export job's files: poll the status URL, download every manifest file, land it.

pfsync.source.export drives a run (resume or kick off, collect, clean up, result); this module holds
the run's state and the collecting. Downloads run in a pool of `export.parallel_downloads` workers
(pfsync.source.download); everything else (polling, manifest.json, `on_file` callbacks, events
other than download_*) happens on the calling thread, so `on_file` is called serially, in the
caller's thread, as soon as each file has landed, while the other downloads continue (download and
load overlap). Each file is recorded once it has landed (pfsync.source.exportjob), so a rerun skips it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import replace
from pathlib import Path

import httpx

from pfsync.core.errors import ExportError, InterruptedRunError, PfsyncError
from pfsync.core.events import EventSink
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import Clock, RetryPolicy
from pfsync.source.bulk import (
    ExportRequest,
    JobExpired,
    Origins,
    delete_job,
    export_id,
    group_exists,
    unknown_group,
)
from pfsync.source.download import Downloaded, Downloader
from pfsync.source.exportjob import ExportDir, ExportJob, LandedFile, file_name, without_query
from pfsync.source.manifest import Issue, Manifest, ManifestFile, issues_in_file
from pfsync.source.poll import Poller

log = logging.getLogger("pfsync.export")


class ExportRun:
    """The state of one run_export call, and the collecting of its job's files (`collect`)."""

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
        # export.deadline covers the whole run: a put-off kick-off, polling and downloads.
        self.deadline_at = clock.now() + settings.deadline

    def warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def collect(self, job: ExportJob) -> ExportJob:
        """Poll, then download every manifest file; returns the job in state "downloaded"."""
        eid = export_id(job.status_url)
        poller = Poller(self.client, self.origins.auth_for(job.status_url, self.auth), self.settings,
                        self.policy, self.clock, self.events, self.stop)  # fmt: skip
        halt = threading.Event()
        numbers: Counter[tuple[str, str]] = Counter()
        pending: dict[Future[Downloaded], str] = {}
        issues: list[Issue] = []
        problems: list[str] = []
        # One worker more than network slots: it starts the next file while another fsyncs its own
        # (docs/export-decisions.md "Landing files durably").
        pool = ThreadPoolExecutor(self.settings.parallel_downloads + 1, thread_name_prefix="download")
        try:
            page_url: str | None = job.status_url
            downloader: Downloader | None = None
            while page_url is not None:
                manifest = poller.poll(page_url, deadline_at=self.deadline_at, started_at=job.kicked_off_at)
                if downloader is None:
                    job, downloader = self._first_page(job, manifest, halt)
                self.events.emit("status_complete", exportId=eid, transactionTime=manifest.transaction_time,
                                 outputFiles=sum(f.kind == "output" for f in manifest.files),
                                 errorFiles=sum(f.kind == "error" for f in manifest.files),
                                 deletedFiles=sum(f.kind == "deleted" for f in manifest.files),
                                 more=manifest.next_url is not None)  # fmt: skip
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
        return self._conclude(job, issues, problems)

    def _first_page(
        self, job: ExportJob, manifest: Manifest, halt: threading.Event
    ) -> tuple[ExportJob, Downloader]:
        """What the first manifest page settles: the local manifest's header, the job's
        transactionTime, an unknown group, and the Downloader of every page."""
        eid = export_id(job.status_url)
        self.dir.manifest.export_id = eid
        self.dir.manifest.transaction_time = manifest.transaction_time
        self.dir.manifest.request = without_query(manifest.request)
        job = self.dir.save_job(replace(job, transaction_time=manifest.transaction_time))
        if not manifest.files and manifest.next_url is None:
            self._check_empty(job)
        downloader = Downloader(self.client, self.auth, self.origins, self.dir, self.policy, self.clock, self.events,
                                eid, manifest.requires_access_token, self.settings.max_line_bytes, halt,
                                validate=self.settings.validate, max_file_bytes=self.settings.max_file_bytes,
                                max_export_bytes=self.settings.max_export_bytes, deadline_at=self.deadline_at,
                                streams=threading.Semaphore(self.settings.parallel_downloads))  # fmt: skip
        return job, downloader

    def _conclude(self, job: ExportJob, issues: list[Issue], problems: list[str]) -> ExportJob:
        """Every file has landed: manifest.json saved whole (also when the export failed, so that it
        names the issues), then the job marked downloaded, or failed on fatal issues."""
        self.dir.manifest.issues, self.dir.manifest.problems = issues, problems
        self.dir.manifest.warnings = self.warnings
        self.dir.save_manifest()
        fatal = [i for i in issues if i.fatal]
        if fatal:
            self.dir.set_state(job, "failed")
            self.cleanup(job)
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
            self.cleanup(job)
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
            found = list(downloaded.issues) if fresh else issues_in_file(landed.path)
            for issue in found:
                if not issue.fatal:
                    self.warn(f"the server reported ({issue.severity}): {issue.text or issue.code}")
            issues.extend(found)
        elif self.on_file is not None:
            self.on_file(landed)

    def cleanup(self, job: ExportJob) -> bool:
        if not self.settings.delete_after_download:
            return False
        try:
            return delete_job(self.client, self.origins.auth_for(job.status_url, self.auth), job.status_url,
                              policy=self.policy, clock=self.clock)  # fmt: skip
        except PfsyncError as exc:
            self.warn(f"could not DELETE the finished export job: {exc}")
            return False
