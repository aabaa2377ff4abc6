"""The export directory: job.json (the saved status URL) and manifest.json (what has landed).

Layout (what `pfsync load DIR` reads: pfsync.core.ndjson.iter_paths yields the output files, also in
per-group subdirectories; `export_files` sorts a directory's files by kind):

    job.json              the job: status URL, request, state; written BEFORE the first poll
    manifest.json         every landed file with kind, type, lines, bytes, sha256; issues, problems
    manifest.journal      files landed since manifest.json was last written, one JSON line each
    <Type>.<n>.ndjson     output files, n = 1.. per type in manifest order
    deleted.<n>.ndjson    `deleted` files (Bundles of DELETE requests, Bulk Data v2)
    error.<n>.ndjson      `error` files (OperationOutcomes)
    .<name>.part          a download in flight (never read by the loader; discarded on resume)

Both JSON files are written atomically (temp file, fsync, os.replace, fsync of the directory:
as smart-fetch's lifecycle.py does), so a kill -9 at any moment leaves either the old or the new
version, and a landed file is only listed once its bytes are on disk under their final name.
A landed file costs one appended, fsynced journal line, not a rewrite of manifest.json (which
grew with every file: quadratic over 100,000 outputs); manifest.json is rewritten, and the
journal removed, once the journal holds as many lines as manifest.json lists files, so the
bytes written stay proportional to the files landed. Reading takes manifest.json, then the
journal's complete lines (a line torn by a kill is ignored: its file is downloaded again).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from pfsync.core.errors import StateError, UsageError
from pfsync.core.ndjson import is_output_name, walk_files
from pfsync.core.private import fsync_dir, open_private, private_dir, replace_atomically
from pfsync.net.http import Clock, RetryPolicy, SystemClock
from pfsync.source.bulk import ExportRequest, Origins, delete_job
from pfsync.source.manifest import Issue, Kind

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
JOURNAL_FILE = "manifest.journal"
_COMPACT_MIN = 64  # journal lines before manifest.json is worth rewriting at all
PART_SUFFIX = ".part"
JobState = Literal["kicked_off", "downloaded", "complete", "failed", "cancelled"]
_VERSION = 1


def without_query(url: str) -> str:
    """A URL safe to write down: signed storage URLs carry their signature in the query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def file_name(kind: Kind, rtype: str, n: int) -> str:
    if kind == "output":
        return f"{rtype}.{n}.ndjson"
    return f"{kind}.{n}.ndjson"


@dataclass(frozen=True)
class ExportFiles:
    """An export directory's data files by kind (manifest order is not needed to tell them apart)."""

    output: tuple[Path, ...]
    deleted: tuple[Path, ...]
    errors: tuple[Path, ...]


def export_files(directory: Path) -> ExportFiles:
    """The files of `directory` and its group subdirectories: resources, deletions, OperationOutcomes.

    Named as `file_name` names them; bookkeeping and in-flight files are skipped (pfsync.core.ndjson.walk_files).
    """
    output: list[Path] = []
    deleted: list[Path] = []
    errors: list[Path] = []
    for path in walk_files(directory):
        if is_output_name(path.name):
            output.append(path)
        elif path.name.startswith("deleted."):
            deleted.append(path)
        else:
            errors.append(path)
    return ExportFiles(tuple(output), tuple(deleted), tuple(errors))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def changed_files(directory: Path, *, sha256: bool = True) -> list[str]:
    """What no longer matches `directory`'s manifest.json, one line per file ("X.ndjson is missing",
    "X.ndjson has 100 bytes, manifest.json records 2000"); with `sha256`, the digests are compared
    too (a read of every file). Reads manifest.json alone, without the journal: it is whole once the
    export is finished. [] without a manifest.json. StateError when it is unreadable."""
    try:
        listed = orjson.loads((directory / MANIFEST_FILE).read_bytes()).get("files") or []
    except FileNotFoundError:
        return []
    except (OSError, orjson.JSONDecodeError, AttributeError) as exc:
        raise StateError(f"{directory / MANIFEST_FILE} is unreadable ({exc.__class__.__name__})") from None
    found = []
    for entry in listed:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name:
            found.append(f"an entry of {MANIFEST_FILE} names no file ({str(entry)[:80]})")
            continue
        size = entry.get("bytes")
        # A missing or null sha256 is compared too (as "None"): it matches no file.
        digest = str(entry.get("sha256")) if sha256 else None
        why = mismatch(directory / name, size if isinstance(size, int) else None, digest)
        if why is not None:
            found.append(f"{name} {why}")
    return found


def mismatch(path: Path, size: int | None, digest: str | None) -> str | None:
    """Why the file at `path` is not the one recorded ("is missing", "has 100 bytes, manifest.json
    records 2000", "has another sha256 ..."), None when it is. A None `size` or `digest` is not
    compared (`digest`: a read of the whole file)."""
    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"has {actual} bytes, {MANIFEST_FILE} records {size}"
    if digest is not None and sha256_of(path) != digest:
        return f"has another sha256 than {MANIFEST_FILE} records"
    return None


@dataclass(frozen=True)
class ExportJob:
    """The saved job of an export directory (job.json)."""

    status_url: str
    request: ExportRequest
    source: str
    base_url: str
    kicked_off_at: float
    state: JobState = "kicked_off"
    transaction_time: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "statusUrl": self.status_url,
            "request": self.request.to_json(),
            "source": self.source,
            "baseUrl": self.base_url,
            "kickedOffAt": self.kicked_off_at,
            "state": self.state,
            "transactionTime": self.transaction_time,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportJob:
        return cls(
            status_url=data["statusUrl"],
            request=ExportRequest.from_json(data["request"]),
            source=data["source"],
            base_url=data["baseUrl"],
            kicked_off_at=float(data["kickedOffAt"]),
            state=data["state"],
            transaction_time=data.get("transactionTime"),
        )


@dataclass(frozen=True)
class LandedFile:
    """A file safely on disk under its final name, as recorded in manifest.json."""

    type: str
    path: Path
    sha256: str
    lines: int
    kind: Kind = "output"
    bytes: int = 0
    count: int | None = None  # what the server's manifest announced, if it did
    url: str = ""  # without its query string

    def to_json(self) -> dict[str, Any]:
        return {"name": self.path.name, "kind": self.kind, "type": self.type, "lines": self.lines,
                "bytes": self.bytes, "sha256": self.sha256, "count": self.count, "url": self.url}  # fmt: skip


@dataclass
class LocalManifest:
    """manifest.json: what the export directory holds. Mutated by one thread (the orchestrator)."""

    export_id: str = ""
    transaction_time: str | None = None
    request: str = ""
    files: dict[str, LandedFile] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "exportId": self.export_id,
            "transactionTime": self.transaction_time,
            "request": self.request,
            "files": [f.to_json() for f in self.files.values()],
            "issues": [{"severity": i.severity, "code": i.code, "text": i.text} for i in self.issues],
            "problems": self.problems,
            "warnings": self.warnings,
        }


class ExportDir:
    """One export's directory: job.json, manifest.json and the landed NDJSON files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            private_dir(path)  # made 0700; an existing one must be ours (its files are patient data)
        except StateError as exc:
            if path.is_dir():
                raise  # there, but not ours
            raise UsageError(f"cannot create the export directory {path}: {exc.message}") from None
        self._journal = path / JOURNAL_FILE
        self._journaled = 0  # journal lines not in manifest.json yet
        self.manifest = self._read_manifest()
        self._saved = len(self.manifest.files)  # files manifest.json lists
        self._replay_journal()

    # ---- job.json --------------------------------------------------------------------------
    def load_job(self) -> ExportJob | None:
        data = self._read_json(self.path / JOB_FILE)
        if data is None:
            return None
        try:
            return ExportJob.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"{self.path / JOB_FILE} is not a job file pfsync understands ({exc.__class__.__name__})",
                hint="remove the export directory (or pick another --out) to start over",
            ) from None

    def save_job(self, job: ExportJob) -> ExportJob:
        replace_atomically(self.path / JOB_FILE, orjson.dumps(job.to_json(), option=orjson.OPT_INDENT_2))
        return job

    def set_state(self, job: ExportJob, state: JobState, **changes: Any) -> ExportJob:
        return self.save_job(replace(job, state=state, **changes))

    # ---- manifest.json ---------------------------------------------------------------------
    def _read_manifest(self) -> LocalManifest:
        data = self._read_json(self.path / MANIFEST_FILE)
        if data is None:
            return LocalManifest()
        try:
            files = {f["name"]: self._landed(f) for f in data.get("files", [])}
            return LocalManifest(
                export_id=data.get("exportId", ""),
                transaction_time=data.get("transactionTime"),
                request=data.get("request", ""),
                files=files,
                issues=[Issue(**i) for i in data.get("issues", [])],
                problems=list(data.get("problems", [])),
                warnings=list(data.get("warnings", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"{self.path / MANIFEST_FILE} is corrupt ({exc.__class__.__name__})",
                hint="remove the export directory (or pick another --out) to start over",
            ) from None

    def save_manifest(self) -> None:
        """manifest.json rewritten whole; the journal it now contains is removed."""
        replace_atomically(
            self.path / MANIFEST_FILE, orjson.dumps(self.manifest.to_json(), option=orjson.OPT_INDENT_2)
        )
        # After the rename: a kill in between leaves lines manifest.json already has (harmless).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._journal)
        self._journaled = 0
        self._saved = len(self.manifest.files)

    def record(self, landed: LandedFile) -> None:
        """Note a landed file durably: one journal line (pfsync.source.exportjob module docstring)."""
        self.manifest.files[landed.path.name] = landed
        self._append(orjson.dumps(landed.to_json()) + b"\n")
        self._journaled += 1
        # The first file also writes manifest.json: a directory with landed files always has one.
        if self._journaled >= max(_COMPACT_MIN, self._saved) or not self._saved:
            self.save_manifest()

    def _append(self, data: bytes) -> None:
        fd = open_private(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            new = os.fstat(fd).st_size == 0
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path)  # the journal's own name must survive a crash too

    def _replay_journal(self) -> None:
        try:
            data = (self.path / JOURNAL_FILE).read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"{self.path / JOURNAL_FILE} is unreadable ({exc.strerror})") from None
        lines = data.split(b"\n")
        for n, line in enumerate(lines[:-1], 1):  # the part after the last newline is torn
            try:
                landed = self._landed(orjson.loads(line))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise StateError(
                    f"{self.path / JOURNAL_FILE} line {n} is corrupt ({exc.__class__.__name__})",
                    hint="remove the export directory (or pick another --out) to start over",
                ) from None
            self.manifest.files[landed.path.name] = landed
            self._journaled += 1

    def _landed(self, f: dict[str, Any]) -> LandedFile:
        return LandedFile(type=f["type"], path=self.path / f["name"], sha256=f["sha256"], lines=int(f["lines"]),
                          kind=f["kind"], bytes=int(f.get("bytes", 0)), count=f.get("count"), url=f.get("url", ""))  # fmt: skip

    def complete(self, name: str) -> LandedFile | None:
        """The recorded file `name` if it is on disk with the recorded sha256 (a resumed run skips it)."""
        landed = self.manifest.files.get(name)
        if landed is None or mismatch(landed.path, landed.bytes, landed.sha256) is not None:
            return None
        return landed

    # ---- files -----------------------------------------------------------------------------
    def part_path(self, name: str) -> Path:
        return self.path / f".{name}{PART_SUFFIX}"

    def clean_parts(self) -> None:
        """Drop downloads a killed run left half-done (they restart; complete files are kept)."""
        for stale in self.path.glob(f".*{PART_SUFFIX}"):
            stale.unlink(missing_ok=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def discard(self) -> None:
        """Forget a previous job's files before a new export (only files manifest.json lists)."""
        for landed in self.manifest.files.values():
            landed.path.unlink(missing_ok=True)
        self.manifest = LocalManifest()
        self.clean_parts()
        self.save_manifest()

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise StateError(
                f"{path} is unreadable ({exc.__class__.__name__})",
                hint="remove the export directory (or pick another --out) to start over",
            ) from None
        if not isinstance(data, dict):
            raise StateError(f"{path} is not a JSON object")
        return data


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
