"""FHIR interactions of the target sandbox (read, create, update, conditional update/delete, history,
search), each charged to the client's quota as docs/medplum.md "Quota costs" measured, shared by the
standalone routes and the batch processor. Attachment URLs in what it sends are presigned by
pfsync.sandbox.target.presign."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from pfsync.sandbox.target.auth import Client
from pfsync.sandbox.target.common import (
    FhirError,
    Json,
    conflict_outcome,
    created_outcome,
    gone,
    invalid,
    is_uuid,
    js_date_string,
    multiple_matches,
    new_id,
    not_found,
    now_instant,
    ok_outcome,
    outcome,
    precondition_failed,
)
from pfsync.sandbox.target.presign import Presigner
from pfsync.sandbox.target.quota import COST_HISTORY, COST_READ, COST_SEARCH, COST_WRITE
from pfsync.sandbox.target.search import matching_ids, parse_query, searchset
from pfsync.sandbox.target.stats import Stats
from pfsync.sandbox.target.store import Row, Store
from pfsync.sandbox.target.validate import validate_resource

# docs/medplum.md "Validation": meta.versionId, lastUpdated, author, project, compartment from the client are
# overwritten; no-op detection ignores them too.
SERVER_META = ("versionId", "lastUpdated", "author", "project", "compartment")
CONDITIONAL_REF_RE = re.compile(r"^([A-Z][A-Za-z]+)\?(.+)$")
LITERAL_REF_RE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")


@dataclass
class Ctx:
    """Who is calling and where the server lives."""

    client: Client
    base: str  # http://127.0.0.1:PORT/

    @property
    def fhir_base(self) -> str:
        return self.base + "fhir/R4/"


@dataclass
class Outcome:
    status: int
    resource: Json | None = None
    oo: Json | None = None
    location: str | None = None  # "Type/id"


def charge(ctx: Ctx, points: int) -> None:
    ctx.client.quota.consume(points)


class Engine:
    def __init__(self, store: Store, stats: Stats, *, check_references: bool = False) -> None:
        self.store = store
        self.stats = stats
        self.check_references = check_references
        # A conditional create runs its search and its create as one step (Medplum: one serializable
        # transaction), so two at once for the same identity make one resource (docs/medplum.md, recorded case 49).
        self._create_once = threading.Lock()
        self.presigner = Presigner(store)

    # ------------------------------------------------------------------ preparing a write
    def prepare(self, ctx: Ctx, rtype: str, body: Any) -> Json:
        if not isinstance(body, dict):
            raise invalid("Invalid resource")
        if body.get("resourceType") != rtype:
            raise invalid("Incorrect resource type", ["resourceType"])
        resource = validate_resource(body)
        self._resolve_conditional_references(ctx, resource, rtype)
        if self.check_references:
            self._check_references(resource, rtype)
        return resource

    def _resolve_conditional_references(self, ctx: Ctx, node: Any, path: str) -> None:
        """docs/medplum.md: conditional references are resolved on every write, cost a search each, must match
        exactly one resource, and become {reference, display} (docs/medplum.md, recorded cases 36, 37)."""
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if isinstance(value, dict) and isinstance(value.get("reference"), str):
                    m = CONDITIONAL_REF_RE.match(value["reference"])
                    if m:
                        node[key] = self._resolve_one(ctx, value["reference"], m, f"{path}.{key}")
                        continue
                if isinstance(value, dict | list):
                    self._resolve_conditional_references(ctx, value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, dict) and isinstance(item.get("reference"), str):
                    m = CONDITIONAL_REF_RE.match(item["reference"])
                    if m:
                        node[i] = self._resolve_one(ctx, item["reference"], m, f"{path}[{i}]")
                        continue
                self._resolve_conditional_references(ctx, item, f"{path}[{i}]")

    def _resolve_one(self, ctx: Ctx, ref: str, m: re.Match[str], path: str) -> Json:
        charge(ctx, COST_SEARCH)
        target_type = m.group(1)
        q = parse_query(target_type, parse_qs(m.group(2), keep_blank_values=True))
        ids = matching_ids(self.store, q)
        if not ids:
            raise invalid(f"Conditional reference '{ref}' did not match any resources", [path])
        if len(ids) > 1:
            raise invalid(f"Conditional reference '{ref}' matched multiple resources", [path])
        row = self.store.read(target_type, ids[0])
        display = display_string(row.resource) if row and row.resource else f"{target_type}/{ids[0]}"
        return {"reference": f"{target_type}/{ids[0]}", "display": display}

    def _check_references(self, node: Any, path: str) -> None:
        """checkReferencesOnWrite: every literal reference must resolve to a readable resource."""
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str):
                m = LITERAL_REF_RE.match(ref)
                if m:
                    row = self.store.read(m.group(1), m.group(2))
                    if row is None or row.deleted:
                        raise invalid(f"Invalid reference ({ref}) not found", [path])
            for key, value in node.items():
                if isinstance(value, dict | list):
                    self._check_references(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                self._check_references(item, f"{path}[{i}]")

    def write_version(self, resource: Json, rid: str, existing: Row | None) -> tuple[Json, bool]:
        """Store `resource` as a new version of `rid` unless it equals the stored one (a no-op: docs/medplum.md
        "Conditional update"). -> (resource as stored, changed)."""
        candidate = {k: v for k, v in resource.items() if k not in ("id", "meta")}
        meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in SERVER_META}
        candidate["id"] = rid
        if meta:
            candidate["meta"] = meta
        if existing is not None and not existing.deleted and existing.resource is not None:
            old = dict(existing.resource)
            old_meta = {k: v for k, v in (old.get("meta") or {}).items() if k not in SERVER_META}
            old.pop("meta", None)
            if old_meta:
                old["meta"] = old_meta
            if old == candidate:
                self.stats.write(False)
                return existing.resource, False
        candidate["meta"] = {**meta, "versionId": new_id(), "lastUpdated": now_instant()}
        self.store.write(candidate)
        self.stats.write(True)
        return candidate, True

    # ------------------------------------------------------------------ interactions
    def create(
        self, ctx: Ctx, rtype: str, body: Any, assigned_id: str | None = None, conflict: bool = False
    ) -> Outcome:
        # docs/medplum.md, recorded cases 21-25: a refused create still costs the write
        charge(ctx, COST_WRITE)
        resource = self.prepare(ctx, rtype, body)
        if conflict:
            raise FhirError(409, conflict_outcome())
        stored, _ = self.write_version(resource, assigned_id or new_id(), None)  # POST ignores a body id
        return Outcome(201, stored, created_outcome(), f"{rtype}/{stored['id']}")

    def create_if_none_exist(
        self,
        ctx: Ctx,
        rtype: str,
        body: Any,
        condition: str,
        assigned_id: str | None = None,
        conflict: bool = False,
    ) -> Outcome:
        """POST with If-None-Exist (docs/medplum.md, recorded case 49): 201 when nothing matches, else 200 with the existing
        resource and no write; several matches are 412, as for a conditional update."""
        charge(ctx, COST_SEARCH)
        with self._create_once:
            ids = matching_ids(self.store, parse_query(rtype, parse_qs(condition, keep_blank_values=True)))
            if len(ids) > 1:
                raise multiple_matches()
            if ids:
                return self.read(ctx, rtype, ids[0])
            return self.create(ctx, rtype, body, assigned_id, conflict=conflict)

    def update(self, ctx: Ctx, rtype: str, rid: str, body: Any, if_match: str | None = None) -> Outcome:
        # docs/medplum.md, recorded cases 44/45: an update by id must name its own type and carry the URL's id in the
        # body; both are checked before anything else (no quota charged: the 400 has no
        # fhirInteractions part), so a body without `id` is refused even for an existing resource.
        if isinstance(body, dict):
            if body.get("resourceType") != rtype:
                raise invalid("Incorrect resource type")
            if body.get("id") != rid:
                raise invalid("Incorrect resource ID")
        # docs/medplum.md, recorded cases 11/12: 404 and "Invalid id" cost the write too
        charge(ctx, COST_WRITE)
        if not is_uuid(rid):
            raise invalid("Invalid id")
        existing = self.store.read(rtype, rid)
        if existing is None:
            raise not_found()  # docs/medplum.md, recorded case 11: no update-as-create
        if existing.deleted:
            raise gone()
        expected = parse_if_match(if_match)
        if expected is not None and expected != existing.vid:
            raise precondition_failed()  # docs/medplum.md, recorded case 35
        resource = self.prepare(ctx, rtype, body)
        stored, _ = self.write_version(resource, rid, existing)
        return Outcome(200, stored, ok_outcome(), f"{rtype}/{rid}")

    def conditional_update(
        self,
        ctx: Ctx,
        rtype: str,
        params: dict[str, list[str]],
        body: Any,
        assigned_id: str | None = None,
        conflict: bool = False,
    ) -> Outcome:
        """PUT Type?search (docs/medplum.md "Conditional update"); `assigned_id`: the id a batch's first pass
        gave this entry (a second entry for the same identity then fails: docs/medplum.md, recorded case 16)."""
        charge(ctx, COST_SEARCH)
        ids = matching_ids(self.store, parse_query(rtype, params))
        body_id = body.get("id") if isinstance(body, dict) else None
        if len(ids) > 1:
            raise multiple_matches()
        if not ids:
            if body_id is not None and assigned_id is None:
                raise invalid("Cannot perform create as update with client-assigned ID", [f"{rtype}.id"])
            return self.create(ctx, rtype, body, assigned_id, conflict=conflict)
        if (assigned_id is not None and ids[0] != assigned_id) or body_id not in (None, ids[0]):
            raise invalid("Resource ID did not match resolved ID", [f"{rtype}.id"])
        return self.update(ctx, rtype, ids[0], {**body, "id": ids[0]} if isinstance(body, dict) else body)

    def read(self, ctx: Ctx, rtype: str, rid: str) -> Outcome:
        charge(ctx, COST_READ)
        # docs/medplum.md, recorded case 13: non-UUID read is 404
        row = self.store.read(rtype, rid) if is_uuid(rid) else None
        if row is None:
            raise not_found()
        if row.deleted:
            raise gone()  # docs/medplum.md, recorded case 40
        return Outcome(200, row.resource, ok_outcome(), f"{rtype}/{rid}")

    def vread(self, ctx: Ctx, rtype: str, rid: str, vid: str) -> Outcome:
        charge(ctx, COST_READ)
        row = self.store.version(rtype, rid, vid) if is_uuid(rid) else None
        if row is None:
            raise not_found()
        if row.deleted:
            raise gone()
        return Outcome(200, row.resource, ok_outcome(), f"{rtype}/{rid}")

    def delete(self, ctx: Ctx, rtype: str, rid: str) -> Outcome:
        charge(ctx, COST_WRITE)
        row = self.store.read(rtype, rid) if is_uuid(rid) else None
        if row is None:
            raise not_found()
        # docs/medplum.md, recorded case 40: deleting again is 200 and adds no history entry
        if not row.deleted:
            self.store.mark_deleted(rtype, rid, new_id(), now_instant())
        return Outcome(200, None, ok_outcome())

    def conditional_delete(self, ctx: Ctx, rtype: str, params: dict[str, list[str]]) -> Outcome:
        charge(ctx, COST_SEARCH)
        ids = matching_ids(self.store, parse_query(rtype, params))
        if len(ids) > 1:
            raise multiple_matches()  # docs/medplum.md, recorded case 41: neither is deleted
        if ids:
            return self.delete(ctx, rtype, ids[0])
        return Outcome(200, None, ok_outcome())

    def search(self, ctx: Ctx, rtype: str, params: dict[str, list[str]]) -> Outcome:
        charge(ctx, COST_SEARCH)  # docs/medplum.md: one search costs 20 whatever its OR-list length
        q = parse_query(rtype, params)
        bundle = searchset(self.store, q, params, ctx.fhir_base)
        for entry in bundle.get("entry", []):
            entry["resource"] = self.present(ctx, entry["resource"])
        return Outcome(200, bundle, ok_outcome())

    def history(self, ctx: Ctx, rtype: str, rid: str) -> Outcome:
        """GET Type/id/_history: newest first, total, a 410 entry for a deletion (docs/medplum.md, recorded cases 40, 42)."""
        charge(ctx, COST_HISTORY)
        rows = self.store.history(rtype, rid) if is_uuid(rid) else []
        if not rows:
            raise not_found()
        entries: list[Json] = []
        for row in rows:
            entry: Json = {
                "fullUrl": f"{ctx.fhir_base}{rtype}/{rid}",
                "request": {"method": "GET", "url": f"{rtype}/{rid}/_history/{row.vid}"},
            }
            if row.deleted:
                entry["response"] = {
                    "status": "410",
                    "outcome": outcome(
                        "error", "deleted", f"Deleted on {js_date_string(row.ts)}", oo_id="gone"
                    ),
                }
            else:
                entry["response"] = {"status": "200", "outcome": ok_outcome()}
                entry["resource"] = self.present(ctx, row.resource or {})
            entries.append(entry)
        return Outcome(
            200, {"resourceType": "Bundle", "type": "history", "entry": entries, "total": len(entries)}
        )

    # ------------------------------------------------------------------ output
    def present(self, ctx: Ctx, resource: Json) -> Json:
        """A resource as the server sends it: attachment urls `Binary/<id>` become presigned storage URLs."""
        return self.presigner.present(ctx.base, resource)

    def presigned_url(self, ctx: Ctx, binary_id: str) -> str | None:
        return self.presigner.presigned_url(ctx.base, binary_id)

    def check_signature(self, binary_id: str, vid: str, expires: str, signature: str) -> bool:
        return self.presigner.check_signature(binary_id, vid, expires, signature)


def parse_if_match(value: str | None) -> str | None:
    """docs/medplum.md, recorded case 35: only a quoted value counts (W/"v" or "v"); unquoted, or W/v, is ignored."""
    if not value:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    if len(v) >= 2 and v.startswith('"') and v.endswith('"'):
        return v[1:-1]
    return None


def display_string(resource: Json) -> str:
    """Medplum's getDisplayString, enough for references: a HumanName as "given family", else name/code text."""
    name = resource.get("name")
    if isinstance(name, list) and name and isinstance(name[0], dict):
        n = name[0]
        # formatHumanName's default: given names then family, no prefix/suffix (docs/medplum.md, recorded case 36: "Jane Doe").
        parts = [*(n.get("given") or []), n.get("family") or ""]
        text = " ".join(str(p) for p in parts if p)
        if text:
            return text
    if isinstance(name, str) and name:
        return name
    code = resource.get("code")
    if isinstance(code, dict) and code.get("text"):
        return str(code["text"])
    return f"{resource.get('resourceType')}/{resource.get('id')}"
