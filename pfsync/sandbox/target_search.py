"""Search in the target sandbox: the parameters the loader needs, with Medplum's Bundle shape.

Supported: identifier (token; commas OR, `\\,` escapes a literal comma, case-sensitive: medplum.md
"Ids and identity"), _id, _count (default 20), _offset, _elements (shown as _fields, SUBSETTED tag:
transcript 32), _summary=count (transcript 34), _total. Links are normalised as transcripts 12/31-34
show: _count added, parameters sorted and percent-encoded, next/previous by _offset, an empty result
has only a self link. No total unless _summary=count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from pfsync.sandbox.target_common import Json, invalid
from pfsync.sandbox.target_store import Store

DEFAULT_COUNT = 20
MAX_COUNT = 1000
SUBSETTED = {"system": "http://hl7.org/fhir/v3/ObservationValue", "code": "SUBSETTED"}
_CONTROL = {"_count", "_offset", "_elements", "_fields", "_summary", "_total", "_sort"}


@dataclass
class Query:
    rtype: str
    identifier: list[list[tuple[str | None, str | None]]] = field(default_factory=list)  # AND of ORs
    ids: list[list[str]] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    elements: list[str] | None = None
    summary_count: bool = False
    extra: dict[str, list[str]] = field(default_factory=dict)


def split_or(value: str) -> list[str]:
    """Split a search value on unescaped commas; `\\,` is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] in ",|$\\":
            cur.append(value[i + 1])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _token(text: str) -> tuple[str | None, str | None]:
    # Escaped pipes were already turned into literal characters by split_or only for commas;
    # a token splits on its first unescaped "|".
    if "|" not in text:
        return None, text
    system, _, value = text.partition("|")
    return system, (value or None)


def parse_query(rtype: str, params: dict[str, list[str]]) -> Query:
    q = Query(rtype)
    for name, values in params.items():
        for value in values:
            if name == "identifier":
                q.identifier.append([_token(v) for v in _split_tokens(value)])
            elif name == "_id":
                q.ids.append(split_or(value))
            elif name == "_count":
                q.count = _int(name, value, 0, MAX_COUNT)
            elif name == "_offset":
                q.offset = _int(name, value, 0, 10**9)
            elif name in ("_elements", "_fields"):
                q.elements = [e.strip() for e in value.split(",") if e.strip()]
            elif name == "_summary":
                if value == "count":
                    q.summary_count = True
            elif name in _CONTROL:
                continue
            else:
                raise invalid(f"Unknown search parameter: {name}")
    return q


def _split_tokens(value: str) -> list[str]:
    """Split on unescaped commas keeping `\\|` escapes for the token split."""
    out, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i + 1] if value[i + 1] == "," else value[i : i + 2])
            i += 2
            continue
        if ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise invalid(f"Invalid {name} value: {value}") from None
    return max(lo, min(hi, n))


def matching_ids(store: Store, q: Query) -> list[str]:
    """All ids matching the query, in storage order (Medplum adds no default ORDER BY either)."""
    result: list[str] | None = None
    for tokens in q.identifier:
        ids = store.ids_by_identifier(q.rtype, tokens)
        keep = set(ids)
        result = ids if result is None else [i for i in result if i in keep]
    for id_list in q.ids:
        if result is None:
            found: list[str] = []
            for rid in dict.fromkeys(id_list):
                row = store.read(q.rtype, rid)
                if row is not None and not row.deleted:
                    found.append(rid)
            result = found
        else:
            wanted = set(id_list)
            result = [i for i in result if i in wanted]
    if result is None:
        result = store.ids_of_type(q.rtype)
    return result


def _link_params(params: dict[str, list[str]], count: int, offset: int | None, summary_count: bool) -> str:
    pairs: list[tuple[str, str]] = []
    for name, values in params.items():
        if name in ("_count", "_offset", "_summary", "_total"):
            continue
        key = "_fields" if name == "_elements" else name
        pairs.extend((key, v) for v in values)
    if summary_count:
        pairs += [("_count", "0"), ("_total", "accurate")]
    else:
        pairs.append(("_count", str(count)))
        if offset:
            pairs.append(("_offset", str(offset)))
    pairs.sort()
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


def subset(resource: Json, elements: list[str]) -> Json:
    """_elements: keep the named elements plus id/meta, and tag the result SUBSETTED (transcript 32)."""
    out: Json = {"resourceType": resource["resourceType"]}
    for name in elements:
        if name in resource:
            out[name] = resource[name]
    out["id"] = resource["id"]
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), dict(SUBSETTED)]
    out["meta"] = meta
    return out


def searchset(store: Store, q: Query, params: dict[str, list[str]], fhir_base: str) -> Json:
    ids = matching_ids(store, q)
    url = f"{fhir_base}{q.rtype}?"
    if q.summary_count:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(ids),
            "link": [{"relation": "self", "url": url + _link_params(params, 0, None, True)}],
        }
    page = ids[q.offset : q.offset + q.count]
    resources = store.read_many(q.rtype, page)
    bundle: Json = {"resourceType": "Bundle", "type": "searchset"}
    if resources:
        bundle["entry"] = [
            {
                "fullUrl": f"{fhir_base}{q.rtype}/{r['id']}",
                "search": {"mode": "match"},
                "resource": subset(r, q.elements) if q.elements else r,
            }
            for r in resources
        ]
    links = [{"relation": "self", "url": url + _link_params(params, q.count, q.offset, False)}]
    if resources:
        links.append({"relation": "first", "url": url + _link_params(params, q.count, None, False)})
        if len(ids) > q.offset + q.count:
            links.append(
                {"relation": "next", "url": url + _link_params(params, q.count, q.offset + q.count, False)}
            )
        if q.offset > 0:
            links.append(
                {
                    "relation": "previous",
                    "url": url + _link_params(params, q.count, max(0, q.offset - q.count), False),
                }
            )
    bundle["link"] = links
    return bundle
