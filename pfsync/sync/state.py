"""Sync state per source (`SyncState`), the `StateStore` interface, and the local JSON backend.

A source's state is one small versioned JSON document (format below). The local backend keeps it in
`{state_dir}/{source}/checkpoint.json`, written atomically (temp file, fsync, rename; as
smart-fetch's lifecycle.py does) with mode 0600. A corrupt or unknown-version file is a StateError and is
never overwritten silently: the operator decides (the message names the file).

    {
      "version": 1,
      "source": "practice-a",
      "transactionTime": "2026-01-02T03:04:05.000Z",   # last export that fully landed (never local clock)
      "lastAttempt": "...", "lastSuccess": "...",      # ISO-8601 UTC
      "lastOutcome": "ok" | "partial" | "failed" | "interrupted" | "locked",
      "lastError": "text" | null,
      "lastRun": {"counts": {"Patient": {"created": 1, ...}}, "durationSeconds": 1.5,
                  "quotaUsed": 0, "exitCode": 0, "transactionTime": "..."},
      "inFlight": {"kind": "incremental"|"full", "exportDir": "exports/<id>", "since": "..."|null,
                   "startedAt": "...", "filesLoaded": ["<sha256>", ...], "backfillGroups": [...]},
      "groupMembers": {"<group id>": ["<patient id>", ...]},
      "totals": {"Patient": {"created": 12, ...}},      # cumulative over completed runs (a counter)
      "retryQueue": "retry.ndjson",
      "lease": {"holder": "...", "token": "...", "expires": "..."} | null    # Medplum backend only
    }
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from pfsync.core.errors import StateError
from pfsync.core.instants import parse_iso
from pfsync.core.private import private_dir, replace_atomically
from pfsync.core.settings import Settings
from pfsync.core.statedir import CHECKPOINT_FILE, LOCK_FILE, RETRY_FILE, source_dir
from pfsync.sync.holders import Holder, Lease, RunLock
from pfsync.sync.lock import FileLock

FORMAT_VERSION = 1
OUTCOMES = ("ok", "partial", "failed", "interrupted", "locked")


@dataclass(frozen=True)
class InFlight:
    """An export that started but whose files have not all landed: the next run resumes it."""

    kind: str  # "incremental" (with _since), "full" (first run) or "backfill" (new group members)
    export_dir: str  # relative to the source's state dir
    since: str | None
    started_at: str
    # Kept for format compatibility, no longer written or trusted: a file the loader returned from may
    # still have resources in flight, so a resumed run offers every landed file again (pfsync.sync.run).
    files_loaded: tuple[str, ...] = ()
    backfill_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class LastRun:
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    duration_seconds: float = 0.0
    quota_used: int = 0
    exit_code: int = 0
    transaction_time: str | None = None


@dataclass(frozen=True)
class SyncState:
    """Everything pfsync remembers about one source between runs."""

    source: str
    transaction_time: str | None = None
    last_attempt: str | None = None
    last_success: str | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_run: LastRun | None = None
    in_flight: InFlight | None = None
    group_members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    retry_queue: str = RETRY_FILE
    lease: Lease | None = None
    # Counts summed over every completed run: Prometheus counters must only go up (`_total`).
    totals: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # When every referenced resource the export leaves out was last re-read (pfsync.load.references).
    referenced_refreshed_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "source": self.source,
            "transactionTime": self.transaction_time,
            "lastAttempt": self.last_attempt,
            "lastSuccess": self.last_success,
            "lastOutcome": self.last_outcome,
            "lastError": self.last_error,
            "lastRun": None,
            "inFlight": None,
            "groupMembers": {g: list(m) for g, m in sorted(self.group_members.items())},
            "retryQueue": self.retry_queue,
            "lease": None,
            "totals": {t: dict(c) for t, c in sorted(self.totals.items())},
            "referencedRefreshedAt": self.referenced_refreshed_at,
        }
        if self.last_run is not None:
            r = self.last_run
            doc["lastRun"] = {"counts": {t: dict(c) for t, c in r.counts.items()},
                              "durationSeconds": r.duration_seconds, "quotaUsed": r.quota_used,
                              "exitCode": r.exit_code, "transactionTime": r.transaction_time}  # fmt: skip
        if self.in_flight is not None:
            f = self.in_flight
            doc["inFlight"] = {"kind": f.kind, "exportDir": f.export_dir, "since": f.since,
                               "startedAt": f.started_at, "filesLoaded": list(f.files_loaded),
                               "backfillGroups": list(f.backfill_groups)}  # fmt: skip
        if self.lease is not None:
            doc["lease"] = {
                "holder": self.lease.holder,
                "token": self.lease.token,
                "expires": self.lease.expires,
            }
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> SyncState:
        """Parse a state document; StateError (naming `where`) when it is not one we understand."""
        if not isinstance(doc, dict):
            raise StateError(f"{where}: not a pfsync state document (expected a JSON object)")
        if doc.get("version") != FORMAT_VERSION:
            raise StateError(
                f"{where}: unsupported state format version {doc.get('version')!r} (this pfsync reads {FORMAT_VERSION})",
                hint="upgrade pfsync, or move the file away to start from a full sync",
            )
        try:
            run = doc.get("lastRun")
            flight = doc.get("inFlight")
            lease = doc.get("lease")
            return cls(
                source=str(doc["source"]),
                transaction_time=_opt_str(doc.get("transactionTime")),
                last_attempt=_opt_str(doc.get("lastAttempt")),
                last_success=_opt_str(doc.get("lastSuccess")),
                last_outcome=_opt_str(doc.get("lastOutcome")),
                last_error=_opt_str(doc.get("lastError")),
                last_run=None if run is None else LastRun(
                    counts={str(t): {str(k): int(v) for k, v in c.items()} for t, c in run["counts"].items()},
                    duration_seconds=float(run["durationSeconds"]), quota_used=int(run["quotaUsed"]),
                    exit_code=int(run["exitCode"]), transaction_time=_opt_str(run.get("transactionTime"))),
                in_flight=None if flight is None else InFlight(
                    kind=str(flight["kind"]), export_dir=str(flight["exportDir"]), since=_opt_str(flight.get("since")),
                    started_at=str(flight["startedAt"]), files_loaded=tuple(str(s) for s in flight["filesLoaded"]),
                    backfill_groups=tuple(str(g) for g in flight.get("backfillGroups", []))),
                group_members={str(g): tuple(str(p) for p in m) for g, m in (doc.get("groupMembers") or {}).items()},
                retry_queue=str(doc.get("retryQueue") or RETRY_FILE),
                lease=None if lease is None else Lease(str(lease["holder"]), str(lease["token"]), str(lease["expires"])),
                totals={str(t): {str(k): int(v) for k, v in c.items()} for t, c in (doc.get("totals") or {}).items()},
                referenced_refreshed_at=_opt_str(doc.get("referencedRefreshedAt")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(
                f"{where}: corrupt state document ({exc.__class__.__name__}: {exc})",
                hint="inspect or move the file away (a missing checkpoint means a full sync next run)",
            ) from None


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


class StateStore(Protocol):
    """Where sync state lives (back ends behind small interfaces; the tests' fake is tests/doubles.py)."""

    backend: str

    def load(self, source: str) -> SyncState:
        """The saved state, or an empty one for a source never synced. StateError when unreadable."""
        ...

    def save(self, state: SyncState) -> None:
        """Persist the state atomically (crash-safe: either the old or the new document)."""
        ...

    def acquire(self, source: str, holder: Holder) -> RunLock:
        """Take the run lock/lease at once or raise LockedError naming the holder."""
        ...

    def holder(self, source: str) -> Holder | None:
        """Who holds the lock now (None when free)."""
        ...


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: never a torn file.

    A private file (the default mode) lives in a directory of ours (pfsync.core.private); a file meant
    for other readers (metrics for node_exporter) may live in a directory someone else owns."""
    private_dir(path.parent, check_owner=not mode & 0o077)
    replace_atomically(path, data, mode)


def last_local_success(settings: Settings, source: str) -> float | None:
    """When the source's last sync succeeded, from the local store (None: never, or another backend)."""
    if settings.state_backend != "local":
        return None
    last = LocalStateStore(settings.state_dir).load(source).last_success
    return parse_iso(last) if last else None


class LocalStateStore:
    """The default backend: `{state_dir}/{source}/checkpoint.json` plus a file lock beside it."""

    backend = "local"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, source: str) -> Path:
        return source_dir(self.state_dir, source) / CHECKPOINT_FILE

    def load(self, source: str) -> SyncState:
        path = self.path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return SyncState(source=source)
        except OSError as exc:
            raise StateError(f"cannot read checkpoint {path}: {exc.strerror}") from None
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise StateError(
                f"checkpoint {path} is corrupt (not JSON: {exc})",
                hint="inspect or move the file away (a missing checkpoint means a full sync next run)",
            ) from None
        state = SyncState.from_json(doc, str(path))
        if state.source != source:
            raise StateError(f"checkpoint {path} belongs to source {state.source!r}, not {source!r}")
        return state

    def save(self, state: SyncState) -> None:
        path = self.path(state.source)
        try:
            write_atomic(path, orjson.dumps(state.to_json(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            raise StateError(f"cannot write checkpoint {path}: {exc.strerror}") from None
        except StateError as exc:  # pfsync.core.private: not ours, or not a directory
            raise StateError(f"cannot write checkpoint {path}: {exc.message}", hint=exc.hint) from None

    def acquire(self, source: str, holder: Holder) -> RunLock:
        # Every run of a source starts here: the state directory must be ours and private.
        private_dir(self.state_dir, tighten=True)
        private_dir(source_dir(self.state_dir, source), tighten=True)
        return FileLock.acquire(source_dir(self.state_dir, source) / LOCK_FILE, holder)

    def holder(self, source: str) -> Holder | None:
        return FileLock.holder(source_dir(self.state_dir, source) / LOCK_FILE)


@contextlib.contextmanager
def locked(store: StateStore, source: str, holder: Holder) -> Iterator[RunLock]:
    lock = store.acquire(source, holder)
    try:
        yield lock
    finally:
        lock.release()
