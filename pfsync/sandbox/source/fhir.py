"""FHIR routes of one source sandbox practice base: discovery, token, export cycle, files, reads, attachments."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson

from pfsync.sandbox.httpbase import Request, Response, json_response
from pfsync.sandbox.source.auth import PF_SCOPE_TYPES, SIGNING_ALGS, Auth, Token
from pfsync.sandbox.source.export import Job, Jobs, KickoffError, manifest, parse_kickoff
from pfsync.sandbox.source.faults import Faults, RateLimiter, Seen, Stats
from pfsync.sandbox.source.store import Store

NDJSON = "application/fhir+ndjson"
# Types other than PF's 22 scoped ones that the datasets hold or PF manifests show (docs/practice-fusion.md).
EXTRA_TYPES = ("Location", "Medication", "MedicationStatement", "Binary", "Claim", "ExplanationOfBenefit",
               "ImagingStudy", "Group")  # fmt: skip
_CHUNK = 256 * 1024


def outcome(status: int, diagnostics: str, code: str = "processing", severity: str = "error",
            headers: dict[str, str] | None = None) -> Response:  # fmt: skip
    """An OperationOutcome reply, shaped like the reference server's (docs/bulk-data.md, recorded cases 20, 25-31, 40)."""
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}  # fmt: skip
    return json_response(status, body, headers=headers)


@dataclass
class State:
    """Everything the routes share; owned by `SourceSandbox`."""

    store: Store
    auth: Auth
    jobs: Jobs
    faults: Faults
    stats: Stats
    known_types: set[str]
    server_url: str = ""
    foreign_url: str = ""
    system_export: bool = False
    resources_per_file: int = 10_000
    attachments_dir: Path | None = None
    practices: list[str] = field(default_factory=list)
    # The sandbox clock of the time-based behaviours (busy_export, the rate limiter); tests share
    # theirs with pfsync's Clock so that minutes of polling take no real time.
    now: Callable[[], float] = time.time
    limiter: RateLimiter | None = None
    # A Group export of an id the practice does not have: "not-found" (404, our reading of PF) or
    # "empty" (202 and an empty manifest, as the SMART reference server does: docs/bulk-data.md, recorded case 23).
    unknown_group: str = "not-found"

    def base(self, practice: str) -> str:
        return f"{self.server_url}/fhir/r4/v1/{practice}"


def _fault_response(state: State, where: str) -> Response | None:
    """429 / 5xx faults shared by token, kick-off, status and download."""
    params = state.faults.take("rate_limit", where=where)
    if params is not None:
        seconds = int(params.get("retry_after") or 1)
        value = formatdate(time.time() + seconds, usegmt=True) if params.get("http_date") else str(seconds)
        return outcome(
            429, "Too Many Requests. Try again later.", "throttled", headers={"Retry-After": value}
        )
    params = state.faults.take("server_error", where=where)
    if params is not None:
        status = int(params.get("status") or 500)
        return outcome(status, f"Simulated server error {status}", "transient")
    return None


def handle(state: State, req: Request, practice: str, rest: str) -> tuple[str, Response]:
    """Route one request under `{Base}`; returns (kind for the counters, response)."""
    base = state.base(practice)
    if rest == "/.well-known/smart-configuration":
        return "metadata", json_response(200, smart_configuration(state, base))
    if rest == "/metadata":
        return "metadata", json_response(
            200, capability_statement(state, practice, base), "application/fhir+json"
        )
    if rest == "/token":
        if req.method != "POST":
            return "token", outcome(405, "Use POST", "not-supported")
        return "token", _fault_response(state, "token") or state.auth.token_endpoint(
            req, practice, f"{base}/token"
        )
    if state.limiter is not None and (route := _limited_route(req, rest)) is not None:
        retry_at = state.limiter.check(route, state.now())
        if retry_at is not None:
            kind = "status" if route == "status" else "kickoff"
            body = b"Too Many Requests. Try again later."
            return kind, Response(
                429, {"Content-Type": "text/html; charset=utf-8", "Retry-After": retry_at}, body
            )
    token = state.auth.check(req, practice)
    # docs/bulk-data.md, recorded cases 20, 80: 401 OperationOutcome, no WWW-Authenticate
    if isinstance(token, str):
        return "unauthorized", outcome(401, token, "login")
    if m := re.fullmatch(r"(?:/Patient|/Group/([^/]+))?/\$export", rest):
        return "kickoff", _kickoff(state, req, practice, base, token, m.group(1), rest)
    if m := re.fullmatch(r"/Export/([0-9a-f-]+)", rest):
        if req.method == "DELETE":
            return "delete", _delete(state, practice, m.group(1))
        return "status", _status(state, practice, m.group(1))
    if m := re.fullmatch(r"/Binary/export/([0-9a-f-]+)/([A-Za-z]+)/(\d+)", rest):
        job = state.jobs.get(m.group(1), practice)
        return "download", serve_file(state, req, job, m.group(2), m.group(3))
    attachment = state.store.attachment(practice, rest.lstrip("/"))
    if attachment is not None and req.method == "GET":
        return "attachment", _attachment(state, rest.lstrip("/"), *attachment)
    if rest == "/Group" and req.method == "GET":
        return "read", _group_list(state, practice, base)
    if m := re.fullmatch(r"/([A-Z][A-Za-z]+)(?:/([A-Za-z0-9.\-]+))?", rest):
        # docs/practice-fusion.md "Defaults, identifiers and politeness": read-only API
        if req.method != "GET":
            return "read", outcome(405, "This server is read-only", "not-supported")
        return "read", _read(state, req, practice, base, token, m.group(1), m.group(2))
    return "read", outcome(404, f"Unknown route {rest}", "not-found")


def _limited_route(req: Request, rest: str) -> str | None:
    """The rate-limited routes of the reference server: the system kick-off, the Patient/Group
    kick-off and the status GET (DELETE and downloads are not limited)."""
    if rest == "/$export":
        return "kickoff-system"
    if re.fullmatch(r"(?:/Patient|/Group/[^/]+)/\$export", rest):
        return "kickoff-patient"
    if req.method == "GET" and re.fullmatch(r"/Export/[0-9a-f-]+", rest):
        return "status"
    return None


def smart_configuration(state: State, base: str) -> dict[str, Any]:
    v2 = state.auth.config.smart_v2
    scopes = ["system/*.read"] + [f"system/{t}.read" for t in PF_SCOPE_TYPES]
    if v2:
        scopes += ["system/*.rs"] + [f"system/{t}.rs" for t in PF_SCOPE_TYPES]
    caps = ["client-confidential-asymmetric", "client-confidential-symmetric", "permission-v1"]
    return {
        "token_endpoint": f"{base}/token",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": SIGNING_ALGS,
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": scopes,
        "capabilities": [*caps, "permission-v2"] if v2 else caps,
    }


def capability_statement(state: State, practice: str, base: str) -> dict[str, Any]:
    ops: list[dict[str, Any]] = []
    resources: list[dict[str, Any]] = []
    for rtype in sorted({*state.store.types(practice), "Group"}):  # groups always exist (default ones)
        entry: dict[str, Any] = {"type": rtype, "interaction": [{"code": "read"}, {"code": "search-type"}]}
        if rtype in ("Patient", "Group"):
            kind = "patient" if rtype == "Patient" else "group"
            entry["operation"] = [
                {
                    "name": "export",
                    "definition": f"http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{kind}-export",
                }
            ]
        resources.append(entry)
    if state.system_export:
        ops.append(
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
        )
    oauth = {"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
             "extension": [{"url": "token", "valueUri": f"{base}/token"}]}  # fmt: skip
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2025-01-01",
        "kind": "instance",
        "software": {"name": "pfsync source sandbox (Practice Fusion emulation)"},
        "implementation": {"description": "Practice Fusion-like FHIR Bulk Data sandbox", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"extension": [oauth], "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]},
            "resource": resources,
            "operation": ops,
        }],
    }  # fmt: skip


def _kickoff(state: State, req: Request, practice: str, base: str, token: Token, group: str | None,
             rest: str) -> Response:  # fmt: skip
    if req.method not in ("GET", "POST"):
        return outcome(405, "Use GET or POST", "not-supported")
    level = "group" if group is not None else ("patient" if rest.startswith("/Patient") else "system")
    if level == "system" and not state.system_export:
        # docs/practice-fusion.md: no system-level $export is documented
        return outcome(404, "System-level export is not supported by this server", "not-supported")
    if group is not None and not state.store.has_group(practice, group) and state.unknown_group != "empty":
        return outcome(404, f'Group "{group}" was not found', "not-found")
    if (fault := _fault_response(state, "kickoff")) is not None:
        return fault
    known = state.known_types | set(state.store.types(practice))
    try:
        export = parse_kickoff(req, practice, level, group, known, token.types)
    except KickoffError as err:
        return outcome(err.status, err.diagnostics, err.code)
    if not export.types:
        export.types = [t for t in state.store.types(practice)
                        if t != "Group" and ("*" in token.types or t in token.types)]  # fmt: skip
    job = state.jobs.start(export, state.store, state.resources_per_file, base, token.client_id, state.now())
    if (params := state.faults.take("slow_export")) is not None:
        job.slow_polls, job.retry_after = int(params["polls"]), params.get("retry_after")
    if (params := state.faults.take("export_fails")) is not None:
        job.fail_status = int(params.get("status") or 500)
    if (params := state.faults.take("unrequested_type")) is not None:
        job.extra_type = str(params.get("type") or "Location")
    job.foreign = state.faults.take("foreign_storage") is not None
    if (params := state.faults.take("busy_export")) is not None:
        job.busy_until = state.now() + float(params.get("seconds") or 0)
        job.retry_after, job.transient = params.get("retry_after"), bool(params.get("transient"))
    if (params := state.faults.take("wrong_count")) is not None:
        job.count_delta = (params.get("type"), int(params.get("delta") or 1000))
    job.files_expired = state.faults.take("file_expired") is not None
    if (params := state.faults.take("failed_files")) is not None:
        job.failing = set(params.get("types") or ())
    state.jobs.launch(job, state.store, state.resources_per_file, base)
    if state.faults.take("revoke_tokens_after_kickoff") is not None:
        state.auth.revoke_all()
    url = f"{base}/Export/{job.guid}"  # docs/practice-fusion.md: Content-Location {Base}/Export/{guid}
    return outcome(202, f'Your request has been accepted. You can check its status at "{url}"', "informational",
                   "information", {"Content-Location": url})  # fmt: skip


def _status(state: State, practice: str, guid: str) -> Response:
    job = state.jobs.get(guid, practice)
    if job is not None and state.faults.take("expired_status") is not None:
        state.jobs.remove(guid)
        job = None
    if job is None:  # docs/bulk-data.md, recorded case 40: after DELETE or expiry
        return outcome(404, "The export was not found", "not-found")
    if (fault := _fault_response(state, "status")) is not None:
        return fault
    if job.fail_status is not None:
        return outcome(job.fail_status, "Export failed: simulated failure", "exception")
    if job.busy_until is not None and state.now() < job.busy_until:
        # docs/bulk-data.md, recorded case 50: the reference server's transient_error, on every poll
        if job.transient:
            return outcome(500, "An unknown error occurred", "transient")
        done = 1 - (job.busy_until - state.now()) / max(job.busy_until - job.created_at, 1e-9)
        headers = {"X-Progress": f"{int(done * 100)}% complete, Please wait..."}
        if job.retry_after is not None:
            headers["Retry-After"] = str(job.retry_after)
        return Response(202, headers)
    if job.slow_polls > 0:
        job.slow_polls -= 1
        headers = {"X-Progress": f"{90 // (job.slow_polls + 1)}% complete, Please wait..."}
        if job.retry_after is not None:
            headers["Retry-After"] = str(job.retry_after)
        return Response(202, headers)
    if not job.done.wait(timeout=0.25):
        return Response(202)  # docs/practice-fusion.md: 202 with no body, no Retry-After, no X-Progress
    if job.failure is not None:
        return outcome(500, job.failure, "exception")
    body = manifest(job, state.auth.config.smart_v2, state.foreign_url if job.foreign else None)
    expires = formatdate(job.created + state.jobs.ttl, usegmt=True)
    return json_response(200, body, headers={"Expires": expires})


def _delete(state: State, practice: str, guid: str) -> Response:
    if not state.jobs.get(guid, practice):
        return outcome(404, "The export was not found", "not-found")
    state.jobs.remove(guid)
    # docs/bulk-data.md, recorded case 40
    return outcome(202, "The procedure was canceled", "informational", "information")


def serve_file(state: State, req: Request, job: Job | None, folder: str, n: str) -> Response:
    """One export file: faults first, then `Range` (206) or the whole file, streamed from disk."""
    if job is None:
        # docs/bulk-data.md, recorded case 40
        return outcome(404, "The exported resources have been deleted", "not-found")
    path = job.directory / folder / n
    if not job.done.is_set() or not path.is_file():
        return outcome(404, "No such export file", "not-found")
    if (fault := _fault_response(state, "download")) is not None:
        return fault
    if job.files_expired:  # docs/bulk-data.md, recorded case 53
        return outcome(410, "Access to the target resource is no longer available at the server and this "
                       "condition is likely to be permanent because the file expired")  # fmt: skip
    headers = {"Content-Type": NDJSON, "Accept-Ranges": "bytes"}
    if (params := state.faults.take("pretty_json", type=folder)) is not None:
        resources = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
        doc: Any = resources[0] if resources and not params.get("bundle") else {
            "resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}  # fmt: skip
        return Response(
            200, {"Content-Type": "application/json"}, orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        )
    if state.faults.take("truncate_download", type=folder) is not None:
        data = path.read_bytes()
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return Response(200, headers, data[: len(data) - 1 - len(last) // 2])
    if state.faults.take("malformed_line", type=folder) is not None:
        first, _, others = path.read_bytes().partition(b"\n")
        return Response(200, headers, first + b'\n{"resourceType": "Observation", "id": broken\n' + others)
    size = path.stat().st_size
    start, end, status = 0, size - 1, 200
    if m := re.fullmatch(r"bytes=(\d*)-(\d*)", req.header("range").strip()):
        if m.group(1):
            start, end = int(m.group(1)), int(m.group(2) or size - 1)
        elif m.group(2):
            start = max(0, size - int(m.group(2)))
        if start >= size:
            return Response(416, {"Content-Range": f"bytes */{size}"})
        end, status = min(end, size - 1), 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    reset = state.faults.take("reset_download", type=folder)
    reset_after = None
    if reset is not None:
        reset_after = int(reset.get("after_bytes") or max(1, (end - start + 1) // 2))
    length = end - start + 1
    return Response(status, headers, _stream(path, start, length), reset_after=reset_after, length=length)


def _stream(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(start)
        while length > 0:
            chunk = fh.read(min(_CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def _attachment(state: State, key: str, content_type: str, size: int) -> Response:
    """Attachment bytes: a file under the data dir's attachments/ if present, else deterministic filler."""
    name = key.rsplit("/", 1)[-1]
    if state.attachments_dir is not None and (state.attachments_dir / name).is_file():
        return Response(200, {"Content-Type": content_type}, (state.attachments_dir / name).read_bytes())
    seed = hashlib.sha256(key.encode()).digest()
    data = (seed * (size // len(seed) + 1))[:size]
    return Response(200, {"Content-Type": content_type}, data)


def _group_list(state: State, practice: str, base: str) -> Response:
    """Searchset of groups with `quantity` and no `member` (docs/bulk-data.md, recorded case 23)."""
    entries = [
        {"fullUrl": f"{base}/Group/{gid}", "resource": {
            "resourceType": "Group", "id": gid, "active": True, "type": "person", "actual": True,
            "name": name, "quantity": count}}
        for gid, name, count in state.store.groups(practice)
    ]  # fmt: skip
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
              "link": [{"relation": "self", "url": f"{base}/Group"}], "entry": entries}  # fmt: skip
    return json_response(200, bundle)


def _read(state: State, req: Request, practice: str, base: str, token: Token, rtype: str,
          rid: str | None) -> Response:  # fmt: skip
    if "*" not in token.types and rtype not in token.types:
        return outcome(403, f"The access token does not grant access to {rtype}", "forbidden")
    if rid is not None:
        blob = state.store.get(practice, rtype, rid)
        if blob is None and rtype == "Group" and state.store.has_group(practice, rid):
            name = next(g[1] for g in state.store.groups(practice) if g[0] == rid)
            blob = orjson.dumps({"resourceType": "Group", "id": rid, "active": True, "type": "person",
                                 "actual": True, "name": name})  # fmt: skip
        if blob is None:
            return outcome(404, f"{rtype}/{rid} was not found", "not-found")
        return Response(200, {"Content-Type": "application/fhir+json"}, blob)
    ids_param = req.param("_id")
    ids = [i for i in ids_param.split(",") if i] if ids_param is not None else None
    count = min(int(req.param("_count") or 50), 1000)
    blobs = state.store.search(practice, rtype, ids, count if ids is None else max(len(ids), 1))
    body = (b'{"resourceType":"Bundle","type":"searchset","total":%d,"entry":[' % len(blobs)
            + b",".join(b'{"fullUrl":"%s","resource":%s}' % (
                f"{base}/{rtype}/{orjson.loads(b)['id']}".encode(), b) for b in blobs)
            + b"]}")  # fmt: skip
    return Response(200, {"Content-Type": "application/fhir+json"}, body)


def record(state: State, req: Request, kind: str, resp: Response) -> None:
    state.stats.record(Seen(kind, req.method, req.base_url + req.raw_path, resp.status,
                            bool(req.header("authorization"))))  # fmt: skip
