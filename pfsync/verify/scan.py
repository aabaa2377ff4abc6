"""What verify reads out of one Medplum resource: its source identities, references and content hash.

References are found by walking the whole resource (contained resources and extensions included),
like pfsync.load.transform does on the source side. A reference counts as:

- `literal`: `Type/<uuid>` (or `{fhir base}Type/<uuid>`): must resolve to a Medplum resource;
- `logical`: `{identifier: {system: <ours>, value}}` with no `reference`: the loader wrote it while
  the target was not loaded yet (pfsync.load.transform.render), so it still waits for its target;
- `unresolved`: a source-form reference left as it was (`Patient/123`, `urn:uuid:<id>`): Medplum
  ids are UUIDs only (docs/medplum.md "Ids and identity"), so it cannot resolve.

Contained `#id`, conditional (`Type?...`) and foreign absolute references are not ours to check.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pfsync.core.marks import OUR_TAG_SYSTEMS
from pfsync.verify.store import RefKind

Json = dict[str, Any]

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(rf"^{_UUID}$")
_LITERAL_RE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([^/?#]+)(?:/_history/[^/]+)?$")
_URN_RE = re.compile(rf"^urn:uuid:({_UUID})$")
# docs/medplum.md "Validation": server-owned meta, overwritten on every write; recorded case 32: _elements
# adds a SUBSETTED tag. Neither is part of what the loader hashed.
_SERVER_META = ("versionId", "lastUpdated", "author", "project", "compartment", "account", "accounts",
                "onBehalfOf")  # fmt: skip
_SUBSETTED = "http://hl7.org/fhir/v3/ObservationValue"


@dataclass(frozen=True)
class FoundRef:
    kind: RefKind
    type: str | None
    id: str


def source_ids(resource: Json, system: str) -> list[str]:
    """The values of `system` among the resource's identifiers (normally exactly one)."""
    out: list[str] = []
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == system:
            value = ident.get("value")
            if isinstance(value, str) and value not in out:
                out.append(value)
    return out


def classify_reference(value: str, fhir_url: str) -> FoundRef | None:
    """What a `reference` string in a Medplum resource points at, or None when it is not ours."""
    if not value or value[0] == "#" or "?" in value:
        return None
    urn = _URN_RE.match(value)
    if urn:
        return FoundRef("unresolved", None, urn.group(1))
    if "://" in value:
        if not value.startswith(fhir_url):
            return None
        value = value[len(fhir_url) :]
    m = _LITERAL_RE.match(value)
    if m is None:
        return None
    rtype, rid = m.group(1), m.group(2)
    return FoundRef("literal" if _UUID_RE.match(rid) else "unresolved", rtype, rid)


def references(resource: Json, fhir_url: str, systems: Mapping[str, str]) -> Iterator[FoundRef]:
    """Every reference of a Medplum resource we can judge; `systems` maps our identifier systems to types."""
    stack: list[Any] = [v for k, v in resource.items() if k not in ("identifier", "meta")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("reference")
        if isinstance(ref, str):
            found = classify_reference(ref, fhir_url)
            if found is not None:
                yield found
        else:
            ident = node.get("identifier")
            if (
                isinstance(ident, dict)
                and ident.get("system") in systems
                and isinstance(ident.get("value"), str)
            ):
                rtype = node.get("type") if isinstance(node.get("type"), str) else systems[ident["system"]]
                yield FoundRef("logical", rtype, ident["value"])
        stack.extend(v for k, v in node.items() if isinstance(v, dict | list) and k != "identifier")


def content_hash(resource: Json, medplum_base: str) -> str:
    """The loader's content hash recomputed from what Medplum holds now.

    Adapter: pfsync.load.transform.render hashes the resource (no `id`, meta without server fields and
    without the hash tag) as sorted-key JSON with BLAKE2b-128. transform does not expose that step
    on its own (asked for in the report); test_verify_scan checks this stays equal to render's hash.
    Medplum also rewrites `attachment.url: Binary/<id>` into a presigned storage URL on every read
    (docs/medplum.md, recorded case 38): turned back here so attachments do not count as drift.
    """
    body = {k: v for k, v in resource.items() if k != "id"}
    meta = body.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in _SERVER_META}
        tags = [
            t
            for t in meta.get("tag") or []
            if not (
                isinstance(t, dict) and (t.get("system") in OUR_TAG_SYSTEMS or t.get("system") == _SUBSETTED)
            )
        ]
        if tags:
            meta["tag"] = tags
        else:
            meta.pop("tag", None)
        body["meta"] = meta
    storage = medplum_base + "storage/"
    body = _unsign(body, storage)
    return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def _unsign(node: Any, storage: str) -> Any:
    if isinstance(node, dict):
        out = {k: _unsign(v, storage) for k, v in node.items()}
        url = out.get("url")
        if isinstance(url, str) and url.startswith(storage):
            out["url"] = "Binary/" + url[len(storage) :].split("/", 1)[0]
        return out
    if isinstance(node, list):
        return [_unsign(v, storage) for v in node]
    return node
