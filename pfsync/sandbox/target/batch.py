"""Batch (and transaction) Bundles in the target sandbox, as Medplum 5.0.x runs them.

docs/medplum.md "Batch Bundles": a first pass runs every conditional PUT's search (a match becomes an update
of `Type/<id>`, a miss gets a server UUID), `urn:uuid:` fullUrls are rewritten, then entries run grouped
(DELETE, POST, PUT, PATCH, GET) while responses stay in request order (docs/medplum.md, recorded case 19). Each entry's error
is that entry's response; once one entry hits the quota every remaining entry is 429 (docs/medplum.md, recorded case 28).
A transaction is processed exactly like a batch (no `transaction-bundles` feature).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pfsync.sandbox.target.common import URN_UUID_RE, FhirError, Json, invalid, is_uuid, new_id
from pfsync.sandbox.target.faults import Faults
from pfsync.sandbox.target.ops import Ctx, Engine, Outcome, charge
from pfsync.sandbox.target.quota import COST_SEARCH
from pfsync.sandbox.target.search import matching_ids, parse_query

METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 3, "GET": 4, "HEAD": 5}


@dataclass
class _Plan:
    index: int
    method: str
    kind: str  # create | cond_create | update | cond_update | delete | cond_delete | read | search | history
    rtype: str
    rid: str | None = None
    params: dict[str, list[str]] = field(default_factory=dict)
    resource: Any = None
    if_match: str | None = None
    if_none_exist: str | None = None


def _entry_error(err: FhirError) -> Json:
    return {"response": {"outcome": err.outcome, "status": str(err.status)}}


def _entry_ok(out: Outcome, ctx: Ctx, engine: Engine) -> Json:
    response: Json = {"outcome": out.oo, "status": str(out.status)}
    if out.location:
        # relative, no _history (docs/medplum.md "Surprises in the recordings", item 5)
        response["location"] = out.location
    entry: Json = {"response": response}
    if out.resource is not None:
        entry["resource"] = engine.present(ctx, out.resource)
    return entry


class BatchProcessor:
    def __init__(self, engine: Engine, faults: Faults) -> None:
        self.engine = engine
        self.faults = faults

    def run(self, ctx: Ctx, bundle: Any) -> Json:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise invalid("Not a bundle")
        btype = bundle.get("type")
        if btype not in ("batch", "transaction"):
            raise invalid("Unrecognized bundle type")
        entries = bundle.get("entry") or []
        results: list[Json | None] = [None] * len(entries)
        throttled: FhirError | None = None
        self.faults.batch_started()
        try:
            with self.engine.store.transaction():  # one SQLite transaction per batch: ingest speed
                plans: list[_Plan] = []
                fullurls: dict[str, str] = {}
                for i, entry in enumerate(entries):
                    if throttled is not None:
                        results[i] = _entry_error(throttled)
                        continue
                    try:
                        plan = self._plan(ctx, i, entry)
                    except FhirError as err:
                        throttled = err if err.status == 429 else None
                        results[i] = _entry_error(err)
                        continue
                    plans.append(plan)
                    full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
                    if isinstance(full_url, str) and URN_UUID_RE.match(full_url) and plan.rid:
                        fullurls[full_url] = f"{plan.rtype}/{plan.rid}"
                if fullurls:
                    for plan in plans:
                        _rewrite_urns(plan.resource, fullurls)
                for plan in sorted(plans, key=lambda p: METHOD_ORDER.get(p.method, 9)):
                    if throttled is not None:
                        results[plan.index] = _entry_error(throttled)
                        continue
                    try:
                        out = self._execute(ctx, plan)
                    except FhirError as err:
                        if err.status == 429:
                            throttled = err
                        results[plan.index] = _entry_error(err)
                    else:
                        results[plan.index] = _entry_ok(out, ctx, self.engine)
        finally:
            self.faults.batch_finished()
        final = [r or {"response": {"status": "500"}} for r in results]
        for r in final:
            self.engine.stats.entry(str(r["response"]["status"]))
        return {"resourceType": "Bundle", "type": f"{btype}-response", "entry": final}

    # ------------------------------------------------------------------ first pass
    def _plan(self, ctx: Ctx, i: int, entry: Any) -> _Plan:
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("url"), str):
            raise invalid("Missing entry.request", [f"Bundle.entry[{i}].request"])
        method = str(request.get("method", "")).upper()
        url = request["url"]
        if url.startswith(ctx.fhir_base):
            url = url[len(ctx.fhir_base) :]
        split = urlsplit(url)
        parts = [p for p in split.path.split("/") if p]
        params = parse_qs(split.query, keep_blank_values=True)
        if not parts:
            raise invalid("Invalid entry.request.url", [f"Bundle.entry[{i}].request.url"])
        rtype = parts[0]
        resource = entry.get("resource")
        plan = _Plan(
            i,
            method,
            "",
            rtype,
            params=params,
            resource=resource,
            if_match=request.get("ifMatch"),
            if_none_exist=request.get("ifNoneExist"),
        )
        if method == "POST" and len(parts) == 1:
            plan.kind, plan.rid = "create", new_id()
        elif method == "PUT" and len(parts) == 2:
            plan.kind, plan.rid = "update", parts[1]
        elif method == "PUT" and len(parts) == 1 and params:
            charge(ctx, COST_SEARCH)  # first pass: every conditional PUT's search runs
            ids = matching_ids(self.engine.store, parse_query(rtype, params))
            if len(ids) > 1:  # docs/medplum.md, recorded case 17: 400 inside a batch, not 412
                raise invalid(
                    "Conditional PUT matched multiple resources", [f"Bundle.entry[{i}].request.url"]
                )
            if ids:
                plan.kind, plan.rid = "update", ids[0]
                if isinstance(resource, dict):
                    plan.resource = {**resource, "id": ids[0]}
            else:
                plan.kind, plan.rid = "cond_create", new_id()
        elif method == "DELETE" and len(parts) == 2:
            plan.kind, plan.rid = "delete", parts[1]
        elif method == "DELETE" and len(parts) == 1 and params:
            plan.kind = "cond_delete"
        elif method in ("GET", "HEAD") and len(parts) == 1:
            plan.kind = "search"
        elif method in ("GET", "HEAD") and len(parts) == 2:
            plan.kind, plan.rid = "read", parts[1]
        elif method in ("GET", "HEAD") and len(parts) == 3 and parts[2] == "_history":
            plan.kind, plan.rid = "history", parts[1]
        else:
            raise invalid(f"Unsupported batch request: {method} {url}", [f"Bundle.entry[{i}].request"])
        if plan.kind in ("create", "update", "cond_create") and not isinstance(resource, dict):
            raise invalid("Missing entry.resource", [f"Bundle.entry[{i}].resource"])
        return plan

    # ------------------------------------------------------------------ second pass
    def _execute(self, ctx: Ctx, plan: _Plan) -> Outcome:
        e = self.engine
        if plan.kind == "create":
            if plan.if_none_exist:
                return e.create_if_none_exist(
                    ctx,
                    plan.rtype,
                    plan.resource,
                    plan.if_none_exist,
                    plan.rid,
                    conflict=self.faults.conflict(),
                )
            return e.create(ctx, plan.rtype, plan.resource, plan.rid, conflict=self.faults.conflict())
        if plan.kind == "cond_create":
            # Run as a conditional update pinned to the first-pass id: a second entry for the same
            # identity now finds the first one's resource and fails (docs/medplum.md, recorded case 16).
            return e.conditional_update(
                ctx, plan.rtype, plan.params, plan.resource, plan.rid, conflict=self.faults.conflict()
            )
        assert plan.rid is not None or plan.kind in ("cond_delete", "search")
        if plan.kind == "update":
            assert plan.rid is not None
            return e.update(ctx, plan.rtype, plan.rid, plan.resource, plan.if_match)
        if plan.kind == "delete":
            assert plan.rid is not None
            return e.delete(ctx, plan.rtype, plan.rid)
        if plan.kind == "cond_delete":
            return e.conditional_delete(ctx, plan.rtype, plan.params)
        if plan.kind == "read":
            assert plan.rid is not None
            return e.read(ctx, plan.rtype, plan.rid)
        if plan.kind == "history":
            assert plan.rid is not None
            return e.history(ctx, plan.rtype, plan.rid)
        out = e.search(ctx, plan.rtype, plan.params)
        return Outcome(200, out.resource, out.oo)


def _rewrite_urns(node: Any, mapping: dict[str, str]) -> None:
    """docs/medplum.md: `urn:uuid:` fullUrl references between entries of one Bundle resolve."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in mapping:
            node["reference"] = mapping[ref]
        for value in node.values():
            if isinstance(value, dict | list):
                _rewrite_urns(value, mapping)
    elif isinstance(node, list):
        for item in node:
            _rewrite_urns(item, mapping)


def add_internal_meta(bundle: Json, ctx: Ctx) -> Json:
    """Async batch results carry meta.author/project/compartment (docs/medplum.md "Surprises in the recordings", item 14)."""
    client = ctx.client
    for entry in bundle.get("entry", []):
        res = entry.get("resource")
        if not isinstance(res, dict) or "id" not in res:
            continue
        compartment = [{"reference": f"Project/{client.project_id}"}]
        if res.get("resourceType") == "Patient":
            compartment.append({"reference": f"Patient/{res['id']}"})
        else:
            for key in ("subject", "patient"):
                ref = res.get(key, {}).get("reference") if isinstance(res.get(key), dict) else None
                if isinstance(ref, str) and ref.startswith("Patient/") and is_uuid(ref[8:]):
                    compartment.append({"reference": ref})
                    break
        res["meta"] = {
            **res.get("meta", {}),
            "author": {"reference": f"ClientApplication/{client.app_id}", "display": client.name},
            "project": client.project_id,
            "compartment": compartment,
        }
    return bundle
