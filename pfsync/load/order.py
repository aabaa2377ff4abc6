"""Load order of a directory of NDJSON files, derived from the data: referenced types first.

One streaming pass notes every identity in the id map (the id -> type index that resolves bare
`urn:uuid:<id>` references) and which types each file references; files are then ordered so a
file comes after the files whose types it references (cycles broken by fewest unmet references).
Loading in this order means few resources wait for their targets (medplum issue: "Load in
dependency order derived from the data"). Among files that are equally ready, those with
attachments go first: their copies (download, then upload as Binary) run beside the other files'
Bundles instead of trailing after the last of them, with the whole load waiting (pfsync.load.attachments).

The pass is cheap, because the load parses every line again: a line that starts the way Bulk
Data writers write resources (`{"resourceType":"T","id":"I"`) and ends with `}` gives its identity
without being parsed (other lines are parsed), and referenced types come from a bytes search of
the first lines for `"reference":"T/` and `"reference":"urn:uuid:`. Parsing and walking every line
here cost a fifth of a small load. A line noted here that turns out unreadable only costs a later
fetch of the target (pfsync.load.references: finish fetches every waited-for target without an id).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from pfsync.core.ndjson import DEFAULT_MAX_LINE_BYTES, Record, iter_file, open_binary
from pfsync.load.idmap import IdMap
from pfsync.load.quarantine import is_wrapped
from pfsync.load.transform import TransformContext

_SAMPLE_LINES = 5000
_MAX_URNS = 10_000
_HEAD_RE = re.compile(
    rb'\s*\{\s*"resourceType"\s*:\s*"([A-Za-z]{1,64})"\s*,\s*"id"\s*:\s*"([A-Za-z0-9\-.]{1,64})"'
)


def dependency_order(
    files: list[Path],
    idmap: IdMap,
    ctx: TransformContext,
    check_stop: Callable[[], None],
    on_unknown: Callable[[str], None] | None = None,
) -> list[Path]:
    """`files` in load order. `on_unknown` (if given) hears, during the scan, each type that has an
    identity the id map holds no Medplum id for: the loader asks Medplum about it at once, so the
    answer is in before the first Bundle instead of holding it back."""
    types: dict[Path, str] = {}
    new_types = _Unknown(on_unknown)
    wants: dict[Path, set[str]] = {}
    urns: dict[Path, set[str]] = {}
    attached: set[Path] = set()
    wrapped = [f for f in files if is_wrapped(f)]
    plain = [f for f in files if f not in wrapped]
    ref_re = _reference_re(ctx.base)
    for path in plain:
        seen: Counter[str] = Counter()
        sample = _Sample()
        if not _scan_fast(path, idmap, ref_re, seen, sample, check_stop, new_types):
            seen.clear()
            sample = _Sample()
            _scan_parsed(path, idmap, ref_re, seen, sample, check_stop, new_types)
        wants[path], urns[path] = sample.wants(), sample.urns()
        if sample.attachments:
            attached.add(path)
        types[path] = seen.most_common(1)[0][0] if seen else ""
    # No commit here: the noted identities reach the disk with the load's first writes (the map
    # is a cache), not while Medplum waits for the first Bundle.
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
            ((_unmet(p, wants, types, pending_types, provided), p not in attached, p.stat().st_size), p)
            for p in remaining
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


def _reference_re(base: str) -> re.Pattern[bytes]:
    """`"reference":"[base/]Type/id` (group 1: Type) or `"reference":"urn:uuid:<id>"` (group 2)."""
    prefix = b"(?:" + re.escape(base.encode()) + b"/)?" if base else b""
    return re.compile(
        rb'"reference"\s*:\s*"(?:' + prefix + rb"([A-Z][A-Za-z]{1,63})/[A-Za-z0-9\-.]{1,64}[\"/]"
        rb"|urn:uuid:([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\")"
    )


@dataclass
class _Sample:
    """What the first lines of a file tell: types referenced, bare urn:uuid ids, attachments.
    Matches are kept as bytes and decoded once at the end (decoding each one cost half the scan)."""

    found: set[tuple[bytes, bytes]] = field(default_factory=set)
    attachments: bool = False

    def add(self, raw: bytes, ref_re: re.Pattern[bytes]) -> None:
        if len(self.found) < _MAX_URNS:
            self.found.update(ref_re.findall(raw))
        else:
            self.found.update(m for m in ref_re.findall(raw) if m[0])
        if not self.attachments and b'"contentType"' in raw and b'"url"' in raw:
            self.attachments = True  # an Attachment (pfsync.load.attachments) that may need a copy

    def wants(self) -> set[str]:
        return {rtype.decode() for rtype, _ in self.found if rtype}

    def urns(self) -> set[str]:
        return {urn.decode() for rtype, urn in self.found if not rtype}


@dataclass
class _Unknown:
    """Types with an identity the id map holds no Medplum id for; `announce` hears each once."""

    announce: Callable[[str], None] | None
    types: set[str] = field(default_factory=set)

    def add(self, rtype: str) -> None:
        self.types.add(rtype)
        if self.announce is not None:
            self.announce(rtype)


def _note(idmap: IdMap, rtype: str, sid: str, new_types: _Unknown) -> None:
    """Note the identity in the id map; its type goes to `new_types` if Medplum's id is not known."""
    if rtype not in new_types.types:
        row = idmap.get(rtype, sid)
        if row is None or row.mid is None:
            new_types.add(rtype)
    idmap.seen(rtype, sid)


def _scan_fast(
    path: Path, idmap: IdMap, ref_re: re.Pattern[bytes], seen: Counter[str], sample: _Sample,
    check_stop: Callable[[], None], new_types: _Unknown,
) -> bool:  # fmt: skip
    """NDJSON line by line; False if the file is not NDJSON (a pretty document: parse it whole)."""
    with open_binary(path) as fh:
        n = 0
        while True:
            line = fh.readline(DEFAULT_MAX_LINE_BYTES + 1)
            if not line:
                return True
            if len(line) > DEFAULT_MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = fh.readline(1024 * 1024)  # over-long: skipped by the load too
                continue
            line = line.strip()
            if not line:
                continue
            n += 1
            if n % 1024 == 0:
                check_stop()
            m = _HEAD_RE.match(line) if line.endswith(b"}") else None
            if m is not None:
                rtype, sid = m.group(1).decode(), m.group(2).decode()
            else:
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    if n == 1 and line.startswith(b"{"):
                        return False
                    continue
                if not isinstance(doc, dict):
                    continue
                rtype, sid = doc.get("resourceType"), doc.get("id")
                if not isinstance(rtype, str) or not isinstance(sid, str):
                    continue
            seen[rtype] += 1
            _note(idmap, rtype, sid, new_types)
            if n <= _SAMPLE_LINES:
                sample.add(line, ref_re)


def _scan_parsed(
    path: Path, idmap: IdMap, ref_re: re.Pattern[bytes], seen: Counter[str], sample: _Sample,
    check_stop: Callable[[], None], new_types: _Unknown,
) -> None:  # fmt: skip
    for n, item in enumerate(iter_file(path)):
        if n % 1024 == 0:
            check_stop()
        if not isinstance(item, Record):
            continue
        rtype, sid = item.resource.get("resourceType"), item.resource.get("id")
        if not isinstance(rtype, str) or not isinstance(sid, str):
            continue
        seen[rtype] += 1
        _note(idmap, rtype, sid, new_types)
        if n < _SAMPLE_LINES:
            sample.add(item.raw, ref_re)
