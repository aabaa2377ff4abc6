"""Search in the target sandbox: the parameters the loader needs, with Medplum's Bundle shape.

Supported: identifier and _tag (tokens; commas OR; `\\,` `\\|` `\\$` `\\\\` escape a literal character
inside a system or value, docs/medplum.md, recorded case 48; case-sensitive: docs/medplum.md "Ids and identity"), _id, _count
(default 20), _offset, _sort=_lastUpdated / -_lastUpdated (docs/medplum.md, recorded case 51), _elements (shown as
_fields, SUBSETTED tag: docs/medplum.md, recorded case 32), _summary=count (docs/medplum.md, recorded case 34), _total. Links are normalised
as docs/medplum.md "Surprises in the recordings", item 12, and recorded cases 31-34/47 show: _count added, parameters sorted and percent-encoded (but the
_fields list keeps its commas), next/previous by _offset, an empty result has only a self link. No
total unless _summary=count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from pfsync.sandbox.target.common import Json, invalid
from pfsync.sandbox.target.store import Store

DEFAULT_COUNT = 20
MAX_COUNT = 1000
SUBSETTED = {"system": "http://hl7.org/fhir/v3/ObservationValue", "code": "SUBSETTED"}
_CONTROL = {"_count", "_offset", "_elements", "_fields", "_summary", "_total"}
_ESCAPABLE = ",|$\\"
SORTS = {"_lastUpdated": False, "-_lastUpdated": True}  # sort key -> descending


@dataclass
class Query:
    rtype: str
    identifier: list[list[tuple[str | None, str | None]]] = field(default_factory=list)  # AND of ORs
    tags: list[list[tuple[str | None, str | None]]] = field(default_factory=list)  # AND of ORs
    sort_desc: bool | None = None  # None: storage order (Medplum adds no default ORDER BY)
    ids: list[list[str]] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    elements: list[str] | None = None
    summary_count: bool = False
    extra: dict[str, list[str]] = field(default_factory=dict)


def _split(value: str, sep: str, maxsplit: int = -1) -> list[str]:
    """Split on unescaped `sep`, keeping escapes (a backslash and the next character) as they are."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i : i + 2])
            i += 2
            continue
        if ch == sep and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def split_or(value: str) -> list[str]:
    """Split a search value on unescaped commas; escaped characters become literal (docs/medplum.md, recorded case 48)."""
    return [_unescape(p) for p in _split(value, ",")]


def _tokens(value: str) -> list[tuple[str | None, str | None]]:
    """OR-ed `system|value` tokens: split on unescaped commas, then on the first unescaped `|`."""
    out: list[tuple[str | None, str | None]] = []
    for part in _split(value, ","):
        pieces = _split(part, "|", maxsplit=1)
        if len(pieces) == 1:
            out.append((None, _unescape(pieces[0])))
        else:
            out.append((_unescape(pieces[0]), _unescape(pieces[1]) or None))
    return out


def parse_query(rtype: str, params: dict[str, list[str]]) -> Query:
    q = Query(rtype)
    for name, values in params.items():
        for value in values:
            if name == "identifier":
                q.identifier.append(_tokens(value))
            elif name == "_tag":
                q.tags.append(_tokens(value))
            elif name == "_sort":
                if value not in SORTS:
                    raise invalid(f"Unknown sort parameter: {value}")
                q.sort_desc = SORTS[value]
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
    for tokens in q.tags:
        result = [i for i in result if _has_tag(store, q.rtype, i, tokens)]
    if q.sort_desc is not None:
        stamps = store.last_updated(q.rtype, result)
        # Instants have millisecond precision: equal ones keep storage order (reversed when descending).
        position = {rid: n for n, rid in enumerate(result)}
        result = sorted(result, key=lambda i: (stamps.get(i, ""), position[i]), reverse=q.sort_desc)
    return result


def _has_tag(store: Store, rtype: str, rid: str, tokens: list[tuple[str | None, str | None]]) -> bool:
    row = store.read(rtype, rid)
    tags = ((row.resource or {}).get("meta") or {}).get("tag") or [] if row is not None else []
    return any(
        isinstance(t, dict)
        and (system is None or t.get("system") == system)
        and (code is None or t.get("code") == code)
        for t in tags
        for system, code in tokens
    )


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
    # Transcript 47: Medplum rebuilds _fields from its parsed list, so its commas stay unencoded.
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=',' if k == '_fields' else '')}" for k, v in pairs)


def subset(resource: Json, elements: list[str]) -> Json:
    """_elements: keep the named elements plus id/meta, and tag the result SUBSETTED (docs/medplum.md, recorded case 32)."""
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
