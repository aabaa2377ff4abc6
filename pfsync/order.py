"""Load order of a directory of NDJSON files, derived from the data: referenced types first.

One streaming pass notes every identity in the id map (the id -> type index that resolves bare
`urn:uuid:<id>` references) and which types each file references; files are then ordered so a
file comes after the files whose types it references (cycles broken by fewest unmet references).
Loading in this order means few resources wait for their targets (medplum issue: "Load in
dependency order derived from the data").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pfsync.idmap import IdMap
from pfsync.ndjson import Record, iter_file
from pfsync.quarantine import is_wrapped
from pfsync.transform import Ref, TransformContext, collect_refs

_SAMPLE_LINES = 5000


def dependency_order(
    files: list[Path], idmap: IdMap, ctx: TransformContext, check_stop: Callable[[], None]
) -> list[Path]:
    types: dict[Path, str] = {}
    wants: dict[Path, set[str]] = {}
    urns: dict[Path, set[str]] = {}
    wrapped = [f for f in files if is_wrapped(f)]
    plain = [f for f in files if f not in wrapped]
    for path in plain:
        seen: Counter[str] = Counter()
        wants[path], urns[path] = set(), set()
        for n, item in enumerate(iter_file(path)):
            if n % 1024 == 0:
                check_stop()
            if not isinstance(item, Record):
                continue
            rtype, sid = item.resource.get("resourceType"), item.resource.get("id")
            if not isinstance(rtype, str) or not isinstance(sid, str):
                continue
            seen[rtype] += 1
            idmap.seen(rtype, sid)
            if n < _SAMPLE_LINES:
                for ref in collect_refs(item.resource, ctx):
                    _want(ref, wants[path], urns[path])
        types[path] = seen.most_common(1)[0][0] if seen else ""
    idmap.commit()
    for path in plain:
        for sid in urns[path]:
            for rtype, _ in idmap.types_of(sid):
                wants[path].add(rtype)
        wants[path].discard(types[path])
    ordered: list[Path] = []
    remaining = sorted(plain, key=lambda p: p.name)
    provided: set[str] = set()
    while remaining:
        pending_types = {types[p] for p in remaining}

        scored = [
            ((_unmet(p, wants, types, pending_types, provided), p.stat().st_size), p) for p in remaining
        ]
        best = min(scored, key=lambda s: s[0])[1]
        ordered.append(best)
        remaining.remove(best)
        if not any(types[p] == types[best] for p in remaining):
            provided.add(types[best])
    return wrapped + ordered


def _unmet(
    p: Path, wants: dict[Path, set[str]], types: dict[Path, str], pending: set[str], provided: set[str]
) -> int:
    return len((wants[p] & pending) - provided - {types[p]})


def _want(ref: Ref, wants: set[str], urns: set[str]) -> None:
    if ref.type is not None:
        wants.add(ref.type)
    elif len(urns) < 10_000:
        urns.add(ref.id)
