"""`pfsync verify`: prove that Medplum matches a source export (present, missing, duplicated, extra,
dangling references, content drift), and with `--fix` repair what can be repaired.

    report = verify(settings, source, medplum_client, [export_dir], VerifyOptions(content=True))

How, in quota points (docs/medplum.md "Quotas and 429"): the source export is read from disk into an
on-disk scratch table (memory stays flat); Medplum is listed type by type with one paged search on
our identifier system (1,000 resources per 20-point search, full bodies so references and content
can be checked); only what the pages did not show is confirmed with batched identifier searches,
and only reference targets we did not see are checked with batched `_id` searches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pfsync.core.errors import HTTPError, UsageError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.marks import resource_hash_from_meta
from pfsync.core.ndjson import Record, iter_file, iter_paths
from pfsync.core.settings import Settings, SourceSettings, identifier_system
from pfsync.core.statedir import IDMAP_FILE, source_dir
from pfsync.load.idmap import fetched_identities
from pfsync.load.transform import (
    Ref,
    Target,
    TransformContext,
    TransformError,
    owned,
    prepare,
    render,
)
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, SystemClock
from pfsync.verify.exports import check_intact, is_incremental
from pfsync.verify.fix import apply_fixes
from pfsync.verify.medplum import MedplumReader
from pfsync.verify.report import CATEGORIES, Category, Finding, TypeCounts, VerifyOptions, VerifyReport
from pfsync.verify.scan import content_hash, references, source_ids
from pfsync.verify.store import Scratch

log = logging.getLogger("pfsync.verify")

CONFIRM_MAX = 10_000  # missing identities re-checked by identifier search (20 points per 100)
_COMMIT_EVERY = 5_000
_NOT_RESOURCES = ("deleted.", "error.")  # export files that hold no source resources


def source_records(export_dirs: Sequence[Path], max_line_bytes: int) -> Iterator[Record | None]:
    """Every resource of the export (None for a line that is not one)."""
    for path in iter_paths(list(export_dirs)):
        if path.name.startswith(_NOT_RESOURCES):
            continue
        for item in iter_file(path, max_line_bytes=max_line_bytes):
            yield item if isinstance(item, Record) else None


class Verifier:
    """One verification of one source against Medplum (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        source: SourceSettings,
        client: MedplumClient,
        *,
        clock: Clock | None = None,
        events: EventSink | None = None,
        reader: MedplumReader | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.medplum = client
        self.clock = clock or SystemClock()
        self.events = events or NullSink()
        self.fhir_url = settings.medplum.fhir_url
        self.reader = reader or MedplumReader(client)
        self.ctx = TransformContext(source, normalize=settings.load.normalize)
        self.work_dir = source_dir(settings.state_dir, source.name)
        self.strangers = 0

    def system(self, rtype: str) -> str:
        return identifier_system(self.source, rtype)

    def _owns(self, resource: dict[str, Any]) -> bool:
        return owned(resource, self.ctx)

    def check(self, export_dirs: Sequence[Path], options: VerifyOptions, scratch: Scratch) -> VerifyReport:
        """Fill `scratch` and compare; no writes to Medplum."""
        self.reader.page_size = options.page_size
        bad = self._read_source(export_dirs, scratch)
        types = sorted(set(scratch.types()) | {t for t in self.source.resource_types if t != "Binary"})
        systems = {self.system(t): t for t in types}
        for rtype in types:
            self._scan_type(rtype, systems, scratch, options.content)
        fetched = sum(scratch.add_fetched(t, s) for t, s in fetched_identities(self.work_dir / IDMAP_FILE))
        scratch.analyze()
        confirmed = self._confirm_missing(scratch, options.content, systems)
        self._check_targets(scratch)
        if options.content:
            self._hash_source(export_dirs, scratch)
        scratch.analyze()
        incremental = any(is_incremental(d) for d in export_dirs)
        notes = []
        if self.strangers:
            notes.append(f"{self.strangers} Medplum resources carry this source's identifiers but are not "
                         "this source's (pfsync.load.transform.owned): left out of the comparison")  # fmt: skip
        if fetched:
            notes.append(
                f"{fetched} resources the loader fetched by reference (not in the export) count as the source's"
            )
        if incremental:
            notes.append("incremental (_since) export: extras are not checked")
        if confirmed is False:
            notes.append(f"more than {CONFIRM_MAX} missing: not re-checked by identifier search")
        report = self._report(export_dirs, scratch, options, bad, not incremental, tuple(notes))
        self.events.emit("verify_complete", ok=report.ok, quota_used=report.quota_used)
        return report

    # ------------------------------------------------------------------ source side
    def _read_source(self, export_dirs: Sequence[Path], scratch: Scratch) -> int:
        for path in export_dirs:
            if not path.is_dir():
                raise UsageError(f"{path}: not a directory", hint="--from takes an export directory")
        bad = n = 0
        for record in source_records(export_dirs, self.settings.export.max_line_bytes):
            sid = record.resource.get("id") if record is not None else None
            rtype = record.resource.get("resourceType") if record is not None else None
            if not isinstance(sid, str) or not isinstance(rtype, str) or not sid.strip():
                bad += 1
                continue
            scratch.add_source(rtype, sid)
            n += 1
            if n % _COMMIT_EVERY == 0:
                scratch.commit()
        self.events.emit("verify_source_read", resources=n, bad_lines=bad)
        return bad

    def _hash_source(self, export_dirs: Sequence[Path], scratch: Scratch) -> None:
        """The content hash the loader would send now, references resolved to what Medplum holds."""

        def resolve(ref: Ref) -> Target | None:
            types = [ref.type] if ref.type is not None else scratch.source_types_of(ref.id)
            for rtype in types:
                mid = scratch.medplum_id(rtype, ref.id)
                if mid is not None:
                    return Target(rtype, mid)
                if scratch.in_source(rtype, ref.id):
                    return Target(rtype, None)
            return None

        n = 0
        for record in source_records(export_dirs, self.settings.export.max_line_bytes):
            if record is None:
                continue
            try:
                prepared = prepare(record.resource, self.ctx)
                rendered = render(prepared, resolve, self.ctx)
            except TransformError:
                continue  # the loader quarantines it: it shows as missing, not as drift
            if rendered.logical:
                continue  # a target is missing from Medplum: reported as missing/dangling, not as drift
            scratch.set_source_hash(prepared.type, prepared.sid, rendered.hash)
            n += 1
            if n % _COMMIT_EVERY == 0:
                scratch.commit()

    # ------------------------------------------------------------------ Medplum side
    def _scan_type(self, rtype: str, systems: dict[str, str], scratch: Scratch, content: bool) -> None:
        system = self.system(rtype)
        n = 0
        for page in self.reader.scan(rtype, system):
            for resource in page:
                self._add_medplum(rtype, resource, system, systems, scratch, content)
                n += 1
            del page, resource  # before the next page is parsed (a page of EOBs is ~50 MB of dicts)
            scratch.commit()
        self.events.emit("verify_scanned", type=rtype, medplum=n, quota_used=self.reader.quota_used)

    def _add_medplum(
        self, rtype: str, resource: dict[str, Any], system: str, systems: dict[str, str], scratch: Scratch,
        content: bool,
    ) -> None:  # fmt: skip
        mid = resource.get("id")
        sids = source_ids(resource, system)
        if not isinstance(mid, str) or not sids:
            return
        if not owned(resource, self.ctx):
            self.strangers += 1  # carries our identifier, but not ours: never counted, fixed or deleted
            return
        meta = resource.get("meta")
        updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
        vid = meta.get("versionId") if isinstance(meta, dict) else None
        tag = resource_hash_from_meta(resource)
        body = content_hash(resource, self.settings.medplum.base_url) if content else None
        for sid in sids:
            scratch.add_medplum(
                rtype,
                mid,
                sid,
                updated if isinstance(updated, str) else None,
                vid if isinstance(vid, str) else None,
                tag,
                body,
            )
        for ref in references(resource, self.fhir_url, systems):
            scratch.add_ref(rtype, mid, ref.kind, ref.type, ref.id)

    def _confirm_missing(self, scratch: Scratch, content: bool, systems: dict[str, str]) -> bool:
        """Re-check what the pages did not show (paging over a changing table can skip rows)."""
        todo: dict[str, list[str]] = {}
        for n, (rtype, sid) in enumerate(scratch.missing()):
            if n >= CONFIRM_MAX:
                return False
            todo.setdefault(rtype, []).append(sid)
        for rtype, sids in todo.items():
            system = self.system(rtype)
            for sid, found in self.reader.find(rtype, system, sids, self._owns).items():
                for f in found:
                    scratch.add_medplum(rtype, f.mid, sid, None, f.vid, f.hash, None)
        return True

    def _check_targets(self, scratch: Scratch) -> None:
        """Literal references to resources we did not list: ask Medplum whether they exist."""
        for rtype, ids in list(scratch.unknown_targets()):
            try:
                for resource in self.reader.by_ids(rtype, ids):
                    if isinstance(resource.get("id"), str):
                        scratch.add_seen(rtype, resource["id"])
            except HTTPError as exc:
                if exc.status not in (400, 404):
                    raise
                log.info("verify: %s is not a type Medplum knows (%s)", rtype, exc.status)

    # ------------------------------------------------------------------ the report
    def _report(
        self, export_dirs: Sequence[Path], scratch: Scratch, options: VerifyOptions, bad: int, extras: bool,
        notes: tuple[str, ...],
    ) -> VerifyReport:  # fmt: skip
        counts = scratch.counts()
        rows = []
        for rtype in sorted(counts):
            c = dict(counts[rtype])
            if not extras:
                c["extra"] = 0
            if not options.content:
                c["drift"] = 0
            rows.append(TypeCounts(rtype, **c))
        findings: list[Finding] = []
        for category in CATEGORIES:
            if (category == "extra" and not extras) or (category == "drift" and not options.content):
                continue
            for i, finding in enumerate(self._findings(category, scratch)):
                if options.limit is not None and i >= options.limit:
                    break
                findings.append(finding)
        stats = self.reader.stats
        return VerifyReport(
            source=self.source.name,
            export_dir=", ".join(str(d) for d in export_dirs),
            types=tuple(rows),
            findings=tuple(findings),
            content_checked=options.content,
            extras_checked=extras,
            quota_used=self.reader.quota_used,
            requests=stats.requests,
            throttled=stats.throttled,
            bad_lines=bad,
            notes=notes,
        )

    def _findings(self, category: Category, scratch: Scratch) -> Iterator[Finding]:
        if category == "missing":
            for rtype, sid in scratch.missing():
                yield Finding("missing", rtype, sid=sid)
        elif category == "duplicated":
            for rtype, sid, mids in scratch.duplicated():
                yield Finding("duplicated", rtype, sid=sid, mids=tuple(mids))
        elif category == "extra":
            for rtype, sid, mid in scratch.extra():
                yield Finding("extra", rtype, sid=sid, mid=mid)
        elif category == "dangling":
            for rtype, mid, kind, ttype, tid in list(scratch.dangling()):
                target = f"{ttype}/{tid}" if ttype else f"urn:uuid:{tid}"
                yield Finding(
                    "dangling", rtype, sid=scratch.sid_of(rtype, mid), mid=mid, target=target, detail=kind
                )
        else:
            for rtype, sid, mid in scratch.drift():
                yield Finding("drift", rtype, sid=sid, mid=mid)


def verify(
    settings: Settings,
    source: SourceSettings,
    client: MedplumClient,
    export_dirs: Sequence[Path],
    options: VerifyOptions | None = None,
    *,
    clock: Clock | None = None,
    events: EventSink | None = None,
) -> VerifyReport:
    """Compare Medplum with the export in `export_dirs`; with `options.fix`, repair and verify again."""
    options = options or VerifyOptions()
    check_intact(export_dirs)  # before anything is compared, let alone fixed
    verifier = Verifier(settings, source, client, clock=clock, events=events)
    scratch = Scratch(verifier.work_dir)
    try:
        report = verifier.check(export_dirs, options, scratch)
        if not options.fix:
            return report
        actions = apply_fixes(verifier, export_dirs, options, scratch, report.extras_checked)
        resends = scratch.fix_count()
    finally:
        scratch.close()
    listed = sum(1 for a in actions if a.kind == "resend")
    verb = "to re-send" if options.dry_run else "re-sent"
    notes = report.notes + ((f"{resends} resources {verb}, {listed} listed",) if resends > listed else ())
    report = replace(report, actions=tuple(actions), dry_run=options.dry_run, notes=notes)
    if options.dry_run or not any(a.done for a in actions):
        return report
    again = Verifier(settings, source, client, clock=clock, events=events, reader=verifier.reader)
    scratch = Scratch(verifier.work_dir)
    try:
        after = again.check(export_dirs, replace(options, fix=False), scratch)
    finally:
        scratch.close()
    return replace(report, after=after, quota_used=verifier.reader.quota_used)
