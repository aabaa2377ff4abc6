"""`pfsync verify --fix`: plan the repairs from the scratch tables, then (unless `--dry-run`) make them.

Order matters:
1. Duplicates first: a conditional write on an identity Medplum holds twice fails (docs/medplum.md
   "Conditional update": 412), so every copy but the oldest (earliest `_history` version; the
   issue) is deleted. Extras are deleted only with `--fix-extras`, and never one that another
   resource in Medplum refers to (`keep_extra`: reported, left alone). Resources the loader
   fetched by reference are the source's, not extras (pfsync.verify.verifier).
2. The id map is brought in line with what the scan saw (it is a cache: pfsync.load.idmap), so the
   loader renders references to the copies that remain; resources to re-send lose their stored
   hash, otherwise the loader would skip them as unchanged (pfsync.load.writes "skip").
3. Missing resources, resources with dangling references that can now resolve, resources that
   pointed at a deleted copy and drifted resources are re-sent through the loader's `Loader`
   (identity, references, no duplicates after a crash: its guarantees, not ours).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pfsync.core.errors import HTTPError
from pfsync.core.events import EventSink
from pfsync.core.ndjson import Record, iter_file, iter_paths
from pfsync.core.private import create_exclusive
from pfsync.core.settings import Settings, SourceSettings
from pfsync.core.statedir import IDMAP_FILE
from pfsync.load.idmap import IdMap
from pfsync.load.loader import Loader
from pfsync.net.http import Clock
from pfsync.verify.medplum import MedplumReader
from pfsync.verify.report import Action, VerifyOptions
from pfsync.verify.store import Scratch

log = logging.getLogger("pfsync.verify")
_NOT_RESOURCES = ("deleted.", "error.")


class Verifier(Protocol):
    """What the repairs need of the check that found them (pfsync.verify.verifier.Verifier)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def source(self) -> SourceSettings: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def events(self) -> EventSink: ...
    @property
    def reader(self) -> MedplumReader: ...
    @property
    def work_dir(self) -> Path: ...


def plan(verifier: Verifier, options: VerifyOptions, scratch: Scratch, extras_checked: bool) -> list[Action]:
    """Every repair `--fix` would make (reads only: `_history` of duplicates to find the oldest)."""
    actions: list[Action] = []
    for rtype, sid, mids in list(scratch.duplicated()):
        created = {mid: verifier.reader.first_version_time(rtype, mid) for mid in mids}
        keep = min(mids, key=lambda m: (created[m] or "\uffff", m))
        for mid in mids:
            if mid != keep:
                actions.append(
                    Action("delete_duplicate", rtype, sid, mid, reason=f"keeping {keep}, the oldest")
                )
                scratch.add_gone(rtype, mid)
    if options.fix_extras and extras_checked:
        for rtype, sid, mid in list(scratch.extra()):
            referrer = scratch.referrer(rtype, mid, sid)
            if referrer is not None:  # deleting it would leave what refers to it dangling
                actions.append(Action("keep_extra", rtype, sid, mid, reason=f"not in the source export, "
                                      f"but {referrer} refers to it: not deleted"))  # fmt: skip
                continue
            actions.append(Action("delete_extra", rtype, sid, mid, reason="not in the source export"))
            scratch.add_gone(rtype, mid)
    scratch.fix_missing()
    for rtype, mid, kind, ttype, tid in list(scratch.dangling()):
        referrer = scratch.sid_of(rtype, mid)
        if (
            referrer is None
            or not scratch.in_source(rtype, referrer)
            or not _resolvable(scratch, kind, ttype, tid)
        ):
            continue
        scratch.add_fix(rtype, referrer, f"dangling {kind} reference to {ttype or 'urn:uuid'}/{tid}")
    for rtype, sid in scratch.referrers_of_gone():
        if scratch.in_source(rtype, sid):
            scratch.add_fix(rtype, sid, "referenced a deleted copy")
    if options.content:
        scratch.fix_drift()
    scratch.commit()
    for n, (rtype, sid, reason) in enumerate(scratch.fixes()):
        if options.limit is not None and n >= options.limit:
            break  # the table lists the first ones; every one is re-sent (the count says how many)
        actions.append(Action("resend", rtype, sid, scratch.medplum_id(rtype, sid), reason=reason))
    return actions


def _resolvable(scratch: Scratch, kind: str, ttype: str | None, tid: str) -> bool:
    """Will re-sending the referrer make this reference resolve? Only if the source names the target."""
    if kind == "literal":
        return True  # a dead Medplum id: the loader re-renders the reference from the source
    types = [ttype] if ttype else scratch.source_types_of(tid)
    return any(scratch.in_source(t, tid) or scratch.medplum_id(t, tid) is not None for t in types)


def apply_fixes(
    verifier: Verifier,
    export_dirs: Sequence[Path],
    options: VerifyOptions,
    scratch: Scratch,
    extras_checked: bool,
) -> list[Action]:
    """Plan, and unless `options.dry_run`, carry the plan out. Returns the actions (done or not)."""
    actions = plan(verifier, options, scratch, extras_checked)
    if options.dry_run or (not actions and scratch.fix_count() == 0):
        return actions
    done: list[Action] = []
    for action in actions:
        if action.kind == "keep_extra":
            done.append(action)  # reported, nothing to do
            continue
        if action.kind == "resend":
            continue
        assert action.mid is not None
        try:
            verifier.reader.delete(action.type, action.mid)
            done.append(_done(action))
        except HTTPError as exc:
            scratch.db.execute("DELETE FROM gone WHERE type = ? AND mid = ?", (action.type, action.mid))
            done.append(_done(action, error=exc.message))
    scratch.commit()
    resends = [a for a in actions if a.kind == "resend"]
    if scratch.fix_count():
        _sync_idmap(verifier, scratch)
        error = _resend(verifier, export_dirs, scratch)
        done += [_done(a, error=error) for a in resends]
    return done


def _done(action: Action, error: str | None = None) -> Action:
    return Action(
        action.kind, action.type, action.sid, action.mid, action.reason, done=error is None, error=error
    )


def _sync_idmap(verifier: Verifier, scratch: Scratch) -> None:
    """Make the loader's id map say what Medplum holds (after the deletions)."""
    idmap = IdMap(verifier.work_dir / IDMAP_FILE, target=verifier.reader.medplum.server_key)
    try:
        for rtype, sid, mid, vid, tag in scratch.kept():
            row = idmap.get(rtype, sid)
            resend = scratch.is_fix(rtype, sid)
            if resend:
                idmap.record(rtype, sid, mid, vid, None)  # no hash: never skipped as unchanged
            elif row is None or row.mid != mid:
                idmap.record(rtype, sid, mid, vid, tag)
        for rtype, sid, _reason in scratch.fixes():
            if scratch.medplum_id(rtype, sid) is None or _all_gone(scratch, rtype, sid):
                idmap.forget(rtype, sid)
        idmap.commit()
    finally:
        idmap.close()


def _all_gone(scratch: Scratch, rtype: str, sid: str) -> bool:
    row = scratch.db.execute(
        "SELECT 1 FROM mp m WHERE m.type = ? AND m.sid = ? AND NOT EXISTS (SELECT 1 FROM gone g "
        "WHERE g.type = m.type AND g.mid = m.mid)",
        (rtype, sid),
    ).fetchone()
    return row is None


def _resend(verifier: Verifier, export_dirs: Sequence[Path], scratch: Scratch) -> str | None:
    """Copy the source lines to re-send into one NDJSON file and load it; -> an error text, if any."""
    path = verifier.work_dir / f".verify-resend-{os.getpid()}.ndjson"
    try:
        with os.fdopen(create_exclusive(path), "wb") as out:
            for file in iter_paths(list(export_dirs)):
                if file.name.startswith(_NOT_RESOURCES):
                    continue
                for item in iter_file(file, max_line_bytes=verifier.settings.export.max_line_bytes):
                    if not isinstance(item, Record):
                        continue
                    resource = item.resource
                    rtype, sid = resource.get("resourceType"), resource.get("id")
                    if isinstance(rtype, str) and isinstance(sid, str) and scratch.is_fix(rtype, sid):
                        out.write(item.raw + b"\n")
        settings = verifier.settings
        with Loader(
            verifier.source, settings.load, verifier.reader.medplum, state_dir=settings.state_dir, http=settings.http,
            clock=verifier.clock, events=verifier.events,
        ) as loader:  # fmt: skip
            loader.load_file(path)
            result = loader.finish()
        if result.quarantined or result.retry_queued:
            return (
                f"{result.quarantined} quarantined, {result.retry_queued} queued for retry "
                "(see the loader's quarantine.ndjson / retry.ndjson)"
            )
        return None
    finally:
        path.unlink(missing_ok=True)
