"""Identity, normalisation and reference rewriting of one source resource (pure CPU, no HTTP).

docs/medplum.md "Ids and identity": Medplum assigns its own UUIDs, so the source `id` is dropped and
carried as an `identifier` (system from `identifier_system(source, type)`, value = source id), and
every reference between source resources is rewritten to the Medplum id through the id map.
Two steps, so the loader can hold a resource back until its targets exist:

    prepared = prepare(resource, ctx)        # identity, meta, normalisation, reference list
    rendered = render(prepared, resolve)      # references rewritten, content hash, bytes

References are found by walking the whole structure (contained resources and extensions
included), not by a list of field names. Forms understood: `Type/id`, `Type/id/_history/v`,
`{source base}/Type/id[...]` and bare `urn:uuid:<id>` (Synthea leftovers naming a resource of the
same export by id: fixtures README). Contained `#id` references, conditional references and
foreign absolute URLs are left as they are.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from pfsync.core.marks import (
    HASH_TAG_SYSTEM,
    LOGICAL_TAG,
    OUR_TAG_SYSTEMS,
    OWNER_TAG_SYSTEM,
)
from pfsync.core.settings import DEFAULT_IDENTIFIER_SYSTEM, SourceSettings, identifier_system

Json = dict[str, Any]

# docs/medplum.md "Validation": server-owned meta from the client is overwritten; drop it so the body
# (and our hash) does not depend on the source's versioning.
_FOREIGN_META = frozenset({"versionId", "lastUpdated", "author", "project", "compartment", "account",
                           "accounts", "onBehalfOf"})  # fmt: skip
_REL_RE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_URN_UUID_RE = re.compile(
    r"^urn:uuid:([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)


class TransformError(Exception):
    """The resource cannot be loaded as it is (the reason goes to the quarantine)."""


@dataclass(frozen=True)
class Ref:
    """A reference to a resource of the same source. `type` is None for `urn:uuid:<id>` (by id alone)."""

    type: str | None
    id: str


@dataclass(frozen=True)
class Target:
    """What the id map knows about a reference target: its type, and its Medplum id once loaded."""

    type: str
    mid: str | None


Resolver = Callable[[Ref], Target | None]


@dataclass(frozen=True)
class TransformContext:
    """Per-source constants of the transformation."""

    source: SourceSettings
    normalize: bool = True

    @property
    def base(self) -> str:
        return self.source.base_url.rstrip("/")

    @property
    def meta_source(self) -> str:
        # docs/medplum.md "Validation": meta.source must be a valid uri.
        return self.base or f"urn:pfsync:source:{quote(self.source.name, safe='')}"

    def system(self, rtype: str) -> str:
        return identifier_system(self.source, rtype)

    @property
    def owner_tag(self) -> Json:
        return {"system": OWNER_TAG_SYSTEM, "code": self.source.name}

    @property
    def reserved_systems(self) -> re.Pattern[str]:
        """Identifier systems pfsync writes: this source's template, the other configured sources'
        and the default one, with {type}, {type_lower} and {source} standing for any value."""
        return _reserved_pattern((self.source.identifier_system, *self.source.peer_systems))


@dataclass
class Prepared:
    """A resource with its identity set and its references found, not yet rewritten."""

    type: str
    sid: str
    resource: Json
    refs: list[tuple[Json, Ref]]
    fixes: int = 0


@dataclass
class Rendered:
    """The bytes to send, their content hash, and the references that stayed logical/unresolved."""

    body: bytes
    hash: str
    logical: list[Ref] = field(default_factory=list)
    unknown: list[Ref] = field(default_factory=list)


def parse_reference(value: str, base: str) -> Ref | None:
    """The source resource a reference string names, or None if it is not ours to rewrite."""
    if not value or value[0] == "#":
        return None  # contained: stays as it is
    if value.startswith("urn:uuid:"):
        m = _URN_UUID_RE.match(value)
        return Ref(None, m.group(1)) if m else None
    if "://" in value:
        if not base or not value.startswith(base + "/"):
            return None  # a foreign absolute URL
        value = value[len(base) + 1 :]
    if "?" in value:
        return None  # a conditional reference: resolved by the server
    m = _REL_RE.match(value)
    return Ref(m.group(1), m.group(2)) if m else None


def prepare(resource: Json, ctx: TransformContext) -> Prepared:
    """Identity, meta and normalisation of a freshly parsed resource (mutated in place)."""
    rtype = resource.get("resourceType")
    sid = resource.get("id")
    if not isinstance(rtype, str) or not rtype:
        raise TransformError("missing resourceType")
    if not isinstance(sid, str) or not sid.strip():
        raise TransformError("resource has no id: it cannot be upserted without creating duplicates")
    del resource["id"]
    refs: list[tuple[Json, Ref]] = []
    try:
        fixes = _scan(resource, refs, ctx.normalize, ctx.base)
    except RecursionError:
        # Hostile or broken input (no FHIR resource nests this deep): quarantine, never crash.
        raise TransformError("resource is nested too deeply to be a FHIR resource") from None
    _set_identity(resource, ctx.system(rtype), sid, ctx.reserved_systems)
    _set_meta(resource, ctx.meta_source)
    return Prepared(rtype, sid, resource, refs, fixes)


def _set_identity(resource: Json, system: str, sid: str, reserved: re.Pattern[str]) -> None:
    """Carry the source id in `system`; drop every other identifier in a pfsync system.

    An incoming identifier in a system pfsync writes would make the resource findable as another
    resource (another source's, or another id of this source's): a source could then take over a
    resource that is not its own. One in this very system with another value contradicts the
    resource's id: quarantined rather than guessed at."""
    idents = resource.get("identifier")
    if not isinstance(idents, list):
        idents = [] if idents is None else [idents]
    kept: list[Any] = []
    own = False
    for ident in idents:
        isys = ident.get("system") if isinstance(ident, dict) else None
        if isinstance(isys, str) and reserved.fullmatch(isys):
            if isys != system:
                continue
            if ident.get("value") != sid:
                raise TransformError(
                    f"identifier {isys}|{ident.get('value')} contradicts the resource's own id {sid!r}"
                )
            if own:
                continue
            own = True  # kept where it is: the body (and its hash) stays what earlier runs sent
        kept.append(ident)
    if not own:
        kept.append({"system": system, "value": sid})
    resource["identifier"] = kept


@functools.lru_cache(maxsize=64)
def _reserved_pattern(templates: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = []
    for tmpl in dict.fromkeys((*templates, DEFAULT_IDENTIFIER_SYSTEM)):
        parts = re.split(r"(\{type\}|\{type_lower\}|\{source\})", tmpl)
        alternatives.append("".join(
            "[^|]+" if part in ("{type}", "{type_lower}", "{source}") else re.escape(part) for part in parts
        ))  # fmt: skip
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives))


def owned(resource: Json, ctx: TransformContext) -> bool:
    """Whether a Medplum resource is provably this source's, from its meta.

    It carries this source's owner tag; or, written before the owner tag existed, it carries no
    owner tag and the `meta.source` this source's loader has always set (another source's loader
    set its own base URL there, and a source cannot choose its meta.source: `_set_meta`)."""
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return False
    marks = [
        t.get("code")
        for t in meta.get("tag") or []
        if isinstance(t, dict) and t.get("system") == OWNER_TAG_SYSTEM
    ]
    if marks:
        return marks == [ctx.source.name]
    return meta.get("source") == ctx.meta_source


def _set_meta(resource: Json, meta_source: str) -> None:
    old = resource.get("meta")
    meta: Json = {}
    if isinstance(old, dict):
        for key, value in old.items():
            if key in _FOREIGN_META or key == "source":
                continue
            if key == "tag" and isinstance(value, list):
                value = [t for t in value if not (isinstance(t, dict) and t.get("system") in OUR_TAG_SYSTEMS)]
                if not value:
                    continue
            meta[key] = value
    meta["source"] = meta_source
    resource["meta"] = meta


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, dict | list) and not value)
    )


def _scan(node: Json, refs: list[tuple[Json, Ref]], normalize: bool, base: str) -> int:
    """Collect references (and, if asked, drop what strict Medplum rejects); -> fixes made.

    Runs for every value of every resource on the loader's thread: leaf types are tested inline
    (most values are strings) rather than through `_blank`, which was a third of its cost."""
    fixes = 0
    dead: list[str] | None = None
    for key, value in node.items():
        if type(value) is str:
            if not normalize or value.strip():
                continue
        elif isinstance(value, dict):
            fixes += _scan(value, refs, normalize, base)
            if not normalize or value:
                continue
        elif isinstance(value, list):
            fixes += _scan_list(value, refs, normalize, base, aligned=_aligned(node, key))
            if not normalize or value:
                continue
        elif not normalize or not _blank(value):
            continue
        # docs/medplum.md "Validation": null values are rejected; empty strings, arrays and objects
        # are noise real EHR data carries (docs/medplum.md, recorded cases 20, 21).
        if dead is None:
            dead = []
        dead.append(key)
    if dead:
        for key in dead:
            del node[key]
        fixes += len(dead)
    ref = node.get("reference")
    if isinstance(ref, str):
        target = parse_reference(ref, base)
        if target is not None:
            refs.append((node, target))
    return fixes


def _aligned(node: Json, key: str) -> bool:
    """Whether list `key` is position-aligned with its `_key` extension array (or is one).

    A blank `_key` (null, []) is dropped by normalisation, so it must not keep `key`'s nulls:
    otherwise a second pass over the stored resource would normalise differently and the content
    hash would change on every run (extra writes)."""
    return key.startswith("_") or not _blank(node.get("_" + key))


def _scan_list(
    items: list[Any], refs: list[tuple[Json, Ref]], normalize: bool, base: str, aligned: bool
) -> int:
    fixes = 0
    blank = False
    for item in items:
        if type(item) is str:
            blank = blank or not item.strip()
        elif isinstance(item, dict):
            fixes += _scan(item, refs, normalize, base)
            blank = blank or not item
        elif isinstance(item, list):
            fixes += _scan_list(item, refs, normalize, base, aligned)
            blank = blank or not item
        else:
            blank = blank or _blank(item)
    # A primitive array and its `_name` extension array are aligned by position: nulls there are
    # placeholders FHIR JSON requires, so only unaligned arrays lose their blank items.
    if normalize and not aligned and blank:
        before = len(items)
        items[:] = [i for i in items if not _blank(i)]
        fixes += before - len(items)
    return fixes


def render(prepared: Prepared, resolve: Resolver, ctx: TransformContext) -> Rendered:
    """Rewrite references through `resolve`, hash the content, add the hash tag, serialise.

    A target that is known but not loaded yet becomes a logical reference (identifier with the
    target's system and source id, display kept): never a dangling literal one. A target whose
    type cannot be known (an unseen `urn:uuid`) is left as it is and reported in `unknown`.
    """
    out = Rendered(b"", "")
    for holder, ref in prepared.refs:
        target = resolve(ref)
        if target is None:
            out.unknown.append(ref)
            continue
        if target.mid is not None:
            holder["reference"] = f"{target.type}/{target.mid}"
            continue
        del holder["reference"]
        holder["identifier"] = {"system": ctx.system(target.type), "value": ref.id}
        holder.setdefault("type", target.type)
        out.logical.append(Ref(target.type, ref.id))
    resource = prepared.resource
    try:
        canonical = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # e.g. orjson's 255-level nesting limit
        raise TransformError(f"resource cannot be serialised: {exc}") from None
    digest = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    meta = resource.setdefault("meta", {})
    tags = meta.get("tag")
    tag = {"system": HASH_TAG_SYSTEM, "code": digest}
    ours = [tag, dict(LOGICAL_TAG)] if out.logical else [tag]
    ours.append(ctx.owner_tag)
    meta["tag"] = [*tags, *ours] if isinstance(tags, list) else ours
    out.body = orjson.dumps(resource)
    out.hash = digest
    return out


def collect_refs(resource: Json, ctx: TransformContext) -> list[Ref]:
    """The source references of a resource, without changing it."""
    refs: list[tuple[Json, Ref]] = []
    _scan(resource, refs, False, ctx.base)
    return [ref for _, ref in refs]
