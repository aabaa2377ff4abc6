"""Which source export `pfsync verify` compares against: the newest finished one, or a fresh one.

`pfsync sync` deletes its exports once loaded (and they are incremental), so a bare verify uses
the newest finished export under `{state_dir}/{source}/exports/` only when it is newer than the last
successful sync, and otherwise runs a full export and keeps it (pfsync.core.statedir).
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pfsync.core.errors import StateError, UsageError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.settings import Settings, SourceSettings
from pfsync.core.statedir import EXPORTS_DIR, source_dir
from pfsync.net.http import Clock, RetryPolicy, make_client
from pfsync.source.auth import source_auth
from pfsync.source.bulk import requests_for
from pfsync.source.export import run_export
from pfsync.source.exportjob import JOB_FILE, MANIFEST_FILE, ExportDir, changed_files


def _finished(path: Path) -> float | None:
    """When this export directory's job was kicked off, if it finished (else None)."""
    if not (path / MANIFEST_FILE).is_file() or path.name.startswith("members-"):
        return None  # members-*: sync's Patient-only group membership exports
    job = ExportDir(path).load_job() if (path / JOB_FILE).is_file() else None
    if job is not None and job.state not in ("downloaded", "complete"):
        return None  # still running, failed or cancelled: its files are not the whole export
    return job.kicked_off_at if job is not None else (path / MANIFEST_FILE).stat().st_mtime


def latest_export(state_dir: Path, source: str) -> list[Path]:
    """The newest finished export under `{state_dir}/{source}/exports/`: either one export directory
    (`pfsync export`) or one sync run directory holding an export per request (`run-*/<fingerprint>/`,
    pfsync.sync.run); a run's directories are returned together (one per group)."""
    root = source_dir(state_dir, source) / EXPORTS_DIR
    best = _newest(root)
    if best is None:
        raise UsageError(
            f"no finished export under {root}",
            hint="run `pfsync export` first, or give a directory with --from DIR, or use --export",
        )
    return best[1]


def _newest(root: Path) -> tuple[float, list[Path]] | None:
    best: tuple[float, list[Path]] | None = None
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if not path.is_dir():
            continue
        dirs = [path] if (path / MANIFEST_FILE).is_file() else sorted(p for p in path.iterdir() if p.is_dir())
        times = [(t, d) for d in dirs if (t := _finished(d)) is not None]
        if times and (best is None or max(t for t, _ in times) > best[0]):
            best = (max(t for t, _ in times), [d for _, d in times])
    return best


def default_export(
    settings: Settings,
    source: SourceSettings,
    *,
    synced_at: float | None,
    clock: Clock | None = None,
    events: EventSink | None = None,
) -> list[Path]:
    """What a bare `pfsync verify` compares against.

    `pfsync sync` deletes its exports once loaded, and they are incremental anyway. So: the newest
    finished export under the state directory, if it is newer than the last successful sync (an
    older one no longer describes the source: what the sync loaded since would show as extras);
    else a fresh full export, kept for the next verify (older `verify-*` exports are removed).
    `synced_at`: when the last sync of the source succeeded (epoch seconds; None: unknown)."""
    root = source_dir(settings.state_dir, source.name) / EXPORTS_DIR
    best = _newest(root)
    if best is not None and (synced_at is None or best[0] >= synced_at):
        return best[1]
    (events or NullSink()).emit("verify_fresh_export", source=source.name,
                                reason="no export newer than the last sync" if best else "no finished export")  # fmt: skip
    dirs = fresh_export(settings, source, clock=clock, events=events)
    keep = {d.parent for d in dirs}
    for old in sorted(root.glob("verify-*")):
        if old.is_dir() and old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return dirs


def is_incremental(export_dir: Path) -> bool:
    """An export with `_since` lists only what changed: absence from it does not mean deleted."""
    if (export_dir / JOB_FILE).is_file():
        job = ExportDir(export_dir).load_job()
        if job is not None:
            return job.request.since is not None
    if (export_dir / MANIFEST_FILE).is_file():
        return "_since=" in ExportDir(export_dir).manifest.request
    return False


def fresh_export(
    settings: Settings, source: SourceSettings, *, clock: Clock | None = None, events: EventSink | None = None
) -> list[Path]:
    """`--export`: a full export now (the export engineer's run_export), one directory per request."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    # Unique per run: two verifies within one second must not resume each other's export.
    root = (
        source_dir(settings.state_dir, source.name) / EXPORTS_DIR / f"verify-{stamp}-{uuid.uuid4().hex[:6]}"
    )
    out: list[Path] = []
    with make_client(settings.http) as client:
        authenticator, auth = source_auth(
            source, client, http=settings.http, clock=clock, negotiate=not settings.export.strict_scopes
        )
        authenticator.token()
        granted = list(authenticator.granted_types(source.resource_types)[0])
        for request in requests_for(source, settings.export, since=None):
            out_dir = root / request.fingerprint()
            run_export(source, settings.export, client, auth, out_dir=out_dir, request=request, clock=clock,
                       events=events, granted_types=granted, policy=RetryPolicy.from_settings(settings.http),
                       unsupported_types=authenticator.unsupported_types)  # fmt: skip
            out.append(out_dir)
    return out


def check_intact(export_dirs: Sequence[Path]) -> None:
    """Refuse an export whose files no longer match its manifest.json (missing, cut short or changed
    since they were downloaded). Compared with it, what the lost lines held would look absent from
    the source, and `--fix --fix-extras` would delete it from Medplum. A directory without
    manifest.json (files put together by hand for `--from`) is taken as it is."""
    for directory in export_dirs:
        changed = changed_files(directory)
        if changed:
            raise StateError(
                f"the export in {directory} no longer matches its manifest.json: {'; '.join(changed[:5])}"
                f"{' ...' if len(changed) > 5 else ''}; comparing with it would take what those files "
                "held for absent from the source",
                hint="compare with a fresh export: pfsync verify --export",
            )
