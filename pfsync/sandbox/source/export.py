"""Bulk Data export jobs of the source sandbox: kick-off parameters, job files on disk, manifests.

Shapes are Practice Fusion's (docs/practice-fusion.md "Bulk export"): status at `{Base}/Export/{guid}`, files
at `{Base}/Binary/export/{guid}/{type}/{n}`. Validation follows the reference server (docs/bulk-data.md, recorded cases 25-31).
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

from pfsync.sandbox.httpbase import Request
from pfsync.sandbox.source.store import Store, instant_to_ms, ms_to_instant

NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
# _typeFilter search parameters we evaluate: token params on a top-level element.
TOKEN_PARAMS = {
    "category": "category",
    "code": "code",
    "clinical-status": "clinicalStatus",
    "verification-status": "verificationStatus",
    "status": "status",
    "type": "type",
    "intent": "intent",
}


class KickoffError(Exception):
    """A refused kick-off: HTTP status and the OperationOutcome diagnostics."""

    def __init__(self, diagnostics: str, status: int = 400, code: str = "processing") -> None:
        super().__init__(diagnostics)
        self.diagnostics, self.status, self.code = diagnostics, status, code


@dataclass
class ExportRequest:
    """A validated kick-off."""

    practice: str
    level: str  # "system", "patient", "group"
    group: str | None
    types: list[str]
    since: int | None
    type_filters: dict[str, list[list[tuple[str, list[str]]]]]
    request_url: str


@dataclass
class Job:
    guid: str
    req: ExportRequest
    directory: Path
    transaction_ms: int
    created: float
    client_id: str
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    slow_polls: int = 0
    retry_after: int | None = None
    fail_status: int | None = None
    foreign: bool = False
    extra_type: str | None = None
    created_at: float = 0.0  # on the sandbox clock (State.now)
    busy_until: float | None = None
    finished_at: float | None = None  # wall clock: when run_job had written every file (benchmarks)
    transient: bool = False
    count_delta: tuple[str | None, int] | None = None
    failing: set[str] = field(default_factory=set)
    files_expired: bool = False
    errors: list[dict[str, Any]] = field(default_factory=list)


def parse_kickoff(
    req: Request, practice: str, level: str, group: str | None, known: set[str], readable: frozenset[str]
) -> ExportRequest:
    """Validate headers and parameters (GET query or POST Parameters body)."""
    # docs/bulk-data.md, recorded case 30: an exact string comparison
    if req.header("accept") != "application/fhir+json":
        raise KickoffError("The Accept header must be application/fhir+json")
    prefer = [p.strip() for p in req.header("prefer").split(",")]
    if "respond-async" not in prefer:  # docs/bulk-data.md, recorded case 29
        raise KickoffError("The Prefer header must be respond-async")
    lenient = "handling=lenient" in prefer
    params: dict[str, list[str]] = {k: list(v) for k, v in req.query.items()}
    if req.method == "POST" and req.body:
        params.update(_parameters_body(req.body))
    for name in params:
        # docs/bulk-data.md, recorded case 31
        if name in ("_includeAssociatedData", "_elements", "patient") and not lenient:
            raise KickoffError(f'The "{name}" parameter is not supported by this server')
    fmt = (params.get("_outputFormat") or ["application/fhir+ndjson"])[0]
    if fmt not in NDJSON_FORMATS:  # docs/bulk-data.md, recorded case 28; docs/practice-fusion.md: ndjson only
        raise KickoffError(f'The "{fmt}" _outputFormat is not supported')
    since: int | None = None
    if params.get("_since"):
        raw = params["_since"][0]
        try:
            since = instant_to_ms(raw)
        except ValueError:
            since = None
        if since is None or since > time.time() * 1000:  # docs/bulk-data.md, recorded cases 26, 27
            raise KickoffError(
                f'Invalid _since parameter "{raw}". It must be valid FHIR instant and cannot be a date in the future'
            )
    types: list[str] = []
    for value in params.get("_type", []):
        types += [t.strip() for t in value.split(",") if t.strip()]
    for rtype in types:
        if rtype not in known:  # docs/bulk-data.md, recorded case 25
            raise KickoffError(f'The requested resource type "{rtype}" is not available on this server')
        if "*" not in readable and rtype not in readable:
            raise KickoffError(f'The access token does not grant access to "{rtype}"', 403, "forbidden")
    filters: dict[str, list[list[tuple[str, list[str]]]]] = {}
    for value in params.get("_typeFilter", []):
        for item in value.split(","):
            rtype, _, query = item.partition("?")
            criteria = []
            for name, values in parse_qs(query).items():
                if name not in TOKEN_PARAMS:
                    raise KickoffError(f'The _typeFilter search parameter "{name}" is not supported')
                criteria.append((name, ",".join(values).split(",")))
            filters.setdefault(rtype, []).append(criteria)
    path = req.raw_path if req.method == "GET" else req.raw_path.split("?")[0]
    return ExportRequest(practice, level, group, types, since, filters, req.base_url + path)


def _parameters_body(body: bytes) -> dict[str, list[str]]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise KickoffError("The request body must be a FHIR Parameters resource") from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise KickoffError("The request body must be a FHIR Parameters resource")
    out: dict[str, list[str]] = {}
    for param in doc.get("parameter", []):
        value = next((v for k, v in param.items() if k.startswith("value")), None)
        if isinstance(value, str):
            out.setdefault(str(param.get("name")), []).append(value)
    return out


def _matches(resource: dict[str, Any], criteria: list[tuple[str, list[str]]]) -> bool:
    for name, wanted in criteria:
        element = resource.get(TOKEN_PARAMS[name])
        found: set[str] = set()
        for item in element if isinstance(element, list) else [element]:
            if isinstance(item, str):
                found.add(item)
            elif isinstance(item, dict):
                for coding in item.get("coding", []):
                    code = str(coding.get("code", ""))
                    found |= {code, f"{coding.get('system', '')}|{code}"}
        if not found & set(wanted):
            return False
    return True


def run_job(job: Job, store: Store, per_file: int, base: str) -> None:
    """Write the job's NDJSON files (streamed: flat memory) and fill in its outputs."""
    req = job.req
    try:
        types = req.types or [t for t in store.types(req.practice) if t != "Group"]
        if job.extra_type and job.extra_type not in types:
            types = [*types, job.extra_type]
        for rtype in types:
            rows = store.export_rows(
                req.practice,
                rtype,
                until=job.transaction_ms,
                since=req.since,
                group=req.group,
                patient_level=req.level != "system" and rtype != job.extra_type,
            )
            if rtype == "Group" and req.level == "system" and req.since is None:
                rows = itertools.chain(rows, store.group_resources(req.practice))
            filters = req.type_filters.get(rtype)
            lines = (r for r in rows if not filters or any(_matches(orjson.loads(r), c) for c in filters))
            if rtype == job.extra_type:
                lines = _with_fallback(lines, rtype)
            entries = _write_files(job, rtype, rtype, lines, per_file, base)
            if rtype in job.failing:
                job.errors += _fail_files(job, entries, base)
            else:
                job.outputs += entries
        # deletions only make sense relative to a _since (docs/bulk-data.md, recorded case 54)
        if req.since is not None:
            gone = store.deleted_rows(
                req.practice,
                types,
                since=req.since,
                until=job.transaction_ms,
                group=req.group,
                patient_level=req.level != "system",
            )
            bundles = (
                orjson.dumps(
                    {
                        "resourceType": "Bundle",
                        "type": "transaction",
                        "entry": [{"request": {"method": "DELETE", "url": f"{t}/{i}"}}],
                    }
                )
                for t, i in gone
            )
            job.deleted += _write_files(job, "Bundle", "deleted", bundles, per_file, base)
    except Exception as exc:  # a failed job reports an OperationOutcome instead of hanging
        job.failure = f"Export failed: {exc!r}"
    finally:
        job.finished_at = time.time()
        job.done.set()


def _fail_files(job: Job, entries: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """Replace output files by error files, as the reference server's some_file_generation_failed
    does (docs/bulk-data.md, recorded case 52): the entry keeps the would-be count, the file is one OperationOutcome with
    no trailing newline."""
    errors: list[dict[str, Any]] = []
    for entry in entries:
        n = len(job.errors) + len(errors) + 1
        folder = job.directory / "error"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{entry['url'].rsplit('/', 2)[-2]}.{entry['url'].rsplit('/', 1)[-1]}"
        (folder / str(n)).write_bytes(orjson.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "processing", "diagnostics": f"Failed to export {name}.ndjson"}]}))  # fmt: skip
        errors.append({"type": "OperationOutcome", "url": f"{base}/Binary/export/{job.guid}/error/{n}",
                       "count": entry["count"]})  # fmt: skip
    return errors


def _with_fallback(lines: Any, rtype: str) -> Any:
    """An unrequested type (docs/practice-fusion.md: Location) needs at least one resource to show up."""
    empty = True
    for line in lines:
        empty = False
        yield line
    if empty:
        yield orjson.dumps(
            {"resourceType": rtype, "id": "sandbox-location-1", "status": "active", "name": "Main Office"}
        )


def _write_files(
    job: Job, rtype: str, folder: str, lines: Any, per_file: int, base: str
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    handle = None
    count = 0
    try:
        for line in lines:
            if handle is None or count >= per_file:
                if handle is not None:
                    handle.close()
                    entries[-1]["count"] = count
                n = len(entries) + 1
                target = job.directory / folder / str(n)
                target.parent.mkdir(parents=True, exist_ok=True)
                handle = target.open("wb")
                entries.append(
                    {"type": rtype, "url": f"{base}/Binary/export/{job.guid}/{folder}/{n}", "count": 0}
                )
                count = 0
            handle.write(line + b"\n")
            count += 1
    finally:
        if handle is not None:
            handle.close()
            entries[-1]["count"] = count
    return entries


class Jobs:
    """Export jobs by guid, with expiry (`ttl` seconds; the reference server keeps them 60 minutes)."""

    def __init__(self, root: Path, ttl: float = 3600) -> None:
        self.root = root
        self.ttl = ttl
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(
        self, req: ExportRequest, store: Store, per_file: int, base: str, client_id: str, now: float
    ) -> Job:
        guid = str(uuid.uuid4())
        job = Job(guid, req, self.root / guid, store.clock.tick(), time.time(), client_id, created_at=now)
        with self._lock:
            self._jobs[guid] = job
        return job

    def launch(self, job: Job, store: Store, per_file: int, base: str) -> None:
        threading.Thread(
            target=run_job, args=(job, store, per_file, base), daemon=True, name="export"
        ).start()

    def get(self, guid: str, practice: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(guid)
        if job is None or job.req.practice != practice:
            return None
        if time.time() - job.created > self.ttl:
            self.remove(guid)
            return None
        return job

    def remove(self, guid: str) -> bool:
        with self._lock:
            job = self._jobs.pop(guid, None)
        if job is not None:
            job.done.wait(timeout=30)
            shutil.rmtree(job.directory, ignore_errors=True)
        return job is not None

    def clear(self) -> None:
        with self._lock:
            guids = list(self._jobs)
        for guid in guids:
            self.remove(guid)


def manifest(job: Job, smart_v2: bool, foreign_base: str | None) -> dict[str, Any]:
    """The completed job's manifest (docs/practice-fusion.md: transactionTime, request, requiresAccessToken...)."""

    def relocate(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if foreign_base is None:
            return entries
        # Signed-storage style: another origin, the job guid and a signature in the URL, no token needed.
        return [
            {**e, "url": foreign_base + e["url"].split("/Binary/export", 1)[1] + "?sig=sandbox"}
            for e in entries
        ]

    outputs = job.outputs
    if job.count_delta is not None:  # the wrong_count fault: announce more lines than served
        rtype, delta = job.count_delta
        outputs = [{**e, "count": e["count"] + delta} if rtype in (None, e["type"]) else e for e in outputs]
    body: dict[str, Any] = {
        "transactionTime": ms_to_instant(job.transaction_ms),
        "request": job.req.request_url,
        "requiresAccessToken": True,
        "output": relocate(outputs),
        "error": relocate(job.errors),
    }
    if smart_v2:  # Bulk Data v2 `deleted[]` (docs/bulk-data.md, recorded case 54); PF does not document it
        body["deleted"] = relocate(job.deleted)
    return body
