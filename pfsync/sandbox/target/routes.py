"""HTTP routing of the target sandbox: token endpoint, FHIR API, presigned storage, control routes."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

import orjson

from pfsync.sandbox.httpbase import Request, Response, json_response
from pfsync.sandbox.target.asyncjobs import AsyncJobs
from pfsync.sandbox.target.auth import Auth, TokenError
from pfsync.sandbox.target.batch import BatchProcessor
from pfsync.sandbox.target.common import (
    FHIR_JSON,
    FhirError,
    Json,
    http_date,
    invalid,
    is_uuid,
    new_id,
    not_found,
    outcome,
    too_large,
    tracing_extension,
)
from pfsync.sandbox.target.faults import Faults
from pfsync.sandbox.target.ops import Ctx, Engine, Outcome, charge
from pfsync.sandbox.target.quota import COST_READ, RequestLimit, throttled_error
from pfsync.sandbox.target.stats import Stats

TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
DEFAULT_MAX_BATCH_SIZE = 50 * 1024 * 1024  # docs/medplum.md "Size limits": maxBatchSize default 50 MB


def _oo_response(err: FhirError, headers: dict[str, str]) -> Response:
    oo = dict(err.outcome)
    oo["extension"] = tracing_extension()
    return json_response(err.status, oo, FHIR_JSON, headers)


def _is_json(content_type: str) -> bool:
    return "json" in content_type.lower()


class TargetApp:
    """Request -> Response for the whole sandbox (one instance per TargetSandbox)."""

    def __init__(
        self,
        *,
        auth: Auth,
        engine: Engine,
        batches: BatchProcessor,
        jobs: AsyncJobs,
        faults: Faults,
        stats: Stats,
        max_json_size: int,
        control: Callable[[Request, list[str]], Response],
    ) -> None:
        self.auth = auth
        self.engine = engine
        self.batches = batches
        self.jobs = jobs
        self.faults = faults
        self.stats = stats
        self.max_json_size = max_json_size
        self.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        self.limits = RequestLimit()
        self._control = control

    def __call__(self, req: Request) -> Response:
        base = req.base_url + "/"
        path = req.path
        if path.startswith("/_sandbox/"):
            return self._control(req, [p for p in path[len("/_sandbox/") :].split("/") if p])
        if path == "/oauth2/token" and req.method == "POST":
            return self._token(req, base)
        if path.startswith("/storage/") and req.method == "GET":
            return self._storage(req, path)
        if path.startswith("/fhir/R4"):
            return self._fhir(req, base, [p for p in path[len("/fhir/R4") :].split("/") if p])
        headers = {"RateLimit": self.limits.hit(False)}
        return _oo_response(not_found(), headers)

    # ------------------------------------------------------------------ auth
    def _token(self, req: Request, base: str) -> Response:
        self.stats.request("POST", "token")
        headers = {"RateLimit": self.limits.hit(True)}
        if self.limits.auth_refused():
            return _oo_response(
                FhirError(429, outcome("error", "throttled", "Too Many Requests", oo_id="too-many-requests")),
                headers,
            )
        try:
            client, token = self.auth.token(req.body, req.header("authorization"))
        except TokenError as err:  # docs/medplum.md, recorded cases 03-05: always 400 invalid_request
            return json_response(
                400, {"error": "invalid_request", "error_description": str(err)}, headers=headers
            )
        return json_response(200, self.auth.token_response(client, token, base), headers=headers)

    def _storage(self, req: Request, path: str) -> Response:
        self.stats.request("GET", "storage")
        parts = [p for p in path.split("/") if p]
        headers = {"RateLimit": self.limits.hit(False)}
        if len(parts) == 3 and self.engine.check_signature(
            parts[1], parts[2], req.param("Expires") or "", req.param("Signature") or ""
        ):
            found = self.engine.store.get_binary(parts[1])
            if found is not None:
                return Response(200, {"Content-Type": found[0], **headers}, found[1])
        return Response(403, {"Content-Type": "text/plain", **headers}, b"Forbidden")

    # ------------------------------------------------------------------ FHIR
    def _fhir(self, req: Request, base: str, parts: list[str]) -> Response:
        kind = _kind(req.method, parts, req.query)
        self.stats.request(req.method, kind)
        headers = {"RateLimit": self.limits.hit(False)}
        fault = self.faults.take()
        if fault is not None:
            self.stats.fault(fault[0])
            if fault[0] == "reset":
                return Response(200, {"Content-Type": FHIR_JSON}, b"{}", reset_after=0)
            if fault[0] == "error":
                return _oo_response(
                    FhirError(fault[1], outcome("error", "exception", "Internal server error")), headers
                )
            if fault[0] == "too_large":
                return _oo_response(too_large(), headers)
        is_async = "respond-async" in req.header("prefer")
        limit = self.max_batch_size if (is_async and not parts) else self.max_json_size
        if _is_json(req.header("content-type")) and len(req.body) > limit:
            # docs/medplum.md, recorded case 27: before auth, no quota header part
            return _oo_response(too_large(), headers)
        client = self.auth.authenticate(req.header("authorization"))
        if client is None:  # docs/medplum.md, recorded cases 06, 07
            return _oo_response(
                FhirError(401, outcome("error", "login", "Unauthorized", oo_id="unauthorized")), headers
            )
        ctx = Ctx(client, base)
        binary_route = bool(parts) and parts[0] == "Binary"
        try:
            if fault is not None and fault[0] == "throttle":
                window = client.quota.window
                raise throttled_error(window.limit + 1, window.seconds * 1000, window.limit)
            if not parts and req.method == "POST" and is_async:
                return self._async_submit(req, ctx, headers)
            if binary_route:
                return self._binary(req, ctx, parts, headers)
            resp = self._dispatch(req, ctx, parts)
        except FhirError as err:
            if not binary_route:
                headers["RateLimit"] += ", " + client.quota.header_part()
            return _oo_response(err, headers)
        resp.headers["RateLimit"] = headers["RateLimit"] + ", " + client.quota.header_part()
        return resp

    def _dispatch(self, req: Request, ctx: Ctx, parts: list[str]) -> Response:
        e = self.engine
        m = req.method
        if not parts:
            if m == "POST":
                return self._fhir_json(200, self.batches.run(ctx, _body(req)))
            raise not_found()
        if parts == ["metadata"]:
            return self._fhir_json(
                200,
                {
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "kind": "instance",
                    "fhirVersion": "4.0.1",
                    "format": ["json"],
                },
            )
        if parts[0] == "job" and len(parts) == 3 and parts[2] == "status" and m == "GET":
            return self._job_status(ctx, parts[1])
        rtype = parts[0]
        if not TYPE_RE.match(rtype):
            raise not_found()
        if len(parts) == 1:
            if m == "GET":
                return self._fhir_json(200, e.search(ctx, rtype, req.query).resource or {})
            if m == "POST":
                condition = req.header("if-none-exist")
                if condition:
                    return self._single(ctx, e.create_if_none_exist(ctx, rtype, _body(req), condition))
                return self._single(ctx, e.create(ctx, rtype, _body(req)))
            if m == "PUT" and req.query:
                return self._single(ctx, e.conditional_update(ctx, rtype, req.query, _body(req)))
            if m == "DELETE" and req.query:
                return self._outcome_json(e.conditional_delete(ctx, rtype, req.query))
        elif len(parts) == 2:
            if m == "GET":
                return self._single(ctx, e.read(ctx, rtype, parts[1]))
            if m == "PUT":
                return self._single(
                    ctx, e.update(ctx, rtype, parts[1], _body(req), req.header("if-match") or None)
                )
            if m == "DELETE":
                return self._outcome_json(e.delete(ctx, rtype, parts[1]))
        elif len(parts) == 3 and parts[2] == "_history" and m == "GET":
            return self._fhir_json(200, e.history(ctx, rtype, parts[1]).resource or {})
        elif len(parts) == 4 and parts[2] == "_history" and m == "GET":
            return self._single(ctx, e.vread(ctx, rtype, parts[1], parts[3]))
        raise invalid(f"Unsupported operation: {m} {'/'.join(parts)}")

    # ------------------------------------------------------------------ responses
    def _fhir_json(self, status: int, payload: Json, headers: dict[str, str] | None = None) -> Response:
        return json_response(status, payload, FHIR_JSON, headers)

    def _outcome_json(self, out: Outcome) -> Response:
        oo = dict(out.oo or {})
        oo["extension"] = tracing_extension()
        return self._fhir_json(out.status, oo)

    def _single(self, ctx: Ctx, out: Outcome, resource: Json | None = None) -> Response:
        """One resource with ETag/Last-Modified, and Location on 201 only (docs/medplum.md "Surprises in the recordings", item 2)."""
        res = resource if resource is not None else self.engine.present(ctx, out.resource or {})
        meta = (out.resource or {}).get("meta") or {}
        headers: dict[str, str] = {}
        if out.status == 201:
            headers["Location"] = f"{ctx.fhir_base}{res['resourceType']}/{res['id']}"
        if "versionId" in meta:
            headers["ETag"] = f'W/"{meta["versionId"]}"'
            headers["Last-Modified"] = http_date(meta["lastUpdated"])
        return self._fhir_json(out.status, res, headers)

    # ------------------------------------------------------------------ Binary (no FHIR quota: docs/medplum.md, recorded case 38)
    def _binary(self, req: Request, ctx: Ctx, parts: list[str], headers: dict[str, str]) -> Response:
        e = self.engine
        ctype = req.header("content-type") or "application/octet-stream"
        if req.method in ("POST", "PUT") and len(parts) <= 2:
            rid = parts[1] if len(parts) == 2 else new_id()
            existing = e.store.read("Binary", rid) if len(parts) == 2 else None
            if len(parts) == 2 and (not is_uuid(rid) or existing is None):
                raise invalid("Invalid id") if not is_uuid(rid) else not_found()
            if ctype.startswith("application/fhir+json"):
                body = _body(req)
                resource = e.prepare(ctx, "Binary", body)
                try:
                    data = base64.b64decode(resource.pop("data", ""), validate=True)
                except binascii.Error:
                    raise invalid("Invalid base64 data", ["Binary.data"]) from None
                content_type = str(resource.get("contentType") or "application/octet-stream")
            else:
                data, content_type = req.body, ctype.split(";")[0].strip()
                resource = {"resourceType": "Binary", "contentType": content_type}
                security = req.header("x-security-context")
                if security:
                    resource["securityContext"] = {"reference": security}
            e.store.put_binary(rid, content_type, data)
            stored, _ = e.write_version(resource, rid, existing)
            out = Outcome(201 if existing is None else 200, stored, None, f"Binary/{rid}")
            res = dict(stored)
            # docs/medplum.md, recorded case 38: the POST response includes url
            res["url"] = e.presigned_url(ctx, rid)
            resp = self._single(ctx, out, res)
        elif req.method == "GET" and len(parts) == 2:
            out = e.read(ctx, "Binary", parts[1])
            if "application/fhir+json" in req.header("accept"):
                resp = self._single(ctx, out)  # without data or url (docs/medplum.md, recorded case 38)
            else:
                found = e.store.get_binary(parts[1])
                ctype_out, data = found if found else ("application/octet-stream", b"")
                resp = self._single(ctx, out)
                resp.headers["Content-Type"] = ctype_out
                resp.body = data
        elif req.method == "DELETE" and len(parts) == 2:
            resp = self._outcome_json(e.delete(ctx, "Binary", parts[1]))
        else:
            raise invalid(f"Unsupported operation: {req.method} {'/'.join(parts)}")
        resp.headers["RateLimit"] = headers["RateLimit"]
        return resp

    # ------------------------------------------------------------------ async
    def _async_submit(self, req: Request, ctx: Ctx, headers: dict[str, str]) -> Response:
        body = _body(req)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise invalid("Not a bundle")
        job_id = self.jobs.submit(ctx, body)
        status_url = f"{ctx.fhir_base}job/{job_id}/status"
        oo = outcome("information", "informational", "Accepted", oo_id="accepted", diagnostics=status_url)
        oo["extension"] = tracing_extension()
        return self._fhir_json(202, oo, {"Content-Location": status_url, **headers})

    def _job_status(self, ctx: Ctx, job_id: str) -> Response:
        charge(ctx, COST_READ)  # docs/medplum.md: even polling got 429 while an async job ran under quota
        row = self.engine.store.read("AsyncJob", job_id) if is_uuid(job_id) else None
        if row is None or row.resource is None:
            raise not_found()
        status = 202 if row.resource.get("status") == "accepted" else 200
        return self._single(ctx, Outcome(status, row.resource))


def _body(req: Request) -> Any:
    try:
        return orjson.loads(req.body) if req.body else None
    except orjson.JSONDecodeError as err:
        raise invalid(f"Invalid JSON: {err}") from None


def _kind(method: str, parts: list[str], query: dict[str, list[str]]) -> str:
    """A short name for the request, for Stats: batch, create, read, search, update, conditional_update, ..."""
    if not parts:
        return "batch"
    if parts[0] == "Binary":
        return "binary"
    if parts[0] == "job":
        return "job"
    if len(parts) == 1:
        return {
            "GET": "search",
            "POST": "create",
            "PUT": "conditional_update",
            "DELETE": "conditional_delete",
        }.get(method, "other")
    if len(parts) == 2:
        return {"GET": "read", "PUT": "update", "DELETE": "delete"}.get(method, "other")
    return "history" if parts[2] == "_history" else "other"
