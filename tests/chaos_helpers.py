"""Chaos-test helpers: sandboxes that can be restarted in place, `pfsync sync` runs killed at chosen
points, source mutations, and an independent comparison of the target with the source.

The comparison does not trust pfsync's own bookkeeping: it reads the source sandbox's store and the
target sandbox's store directly and checks, by identifier (docs/medplum.md "Ids and identity"), that every
live source resource is in Medplum exactly once with the same content, that nothing deleted or
unknown is left there, and that every reference resolves (tests/refcheck.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from refcheck import check_references, references_in

from pfsync.core.settings import DEFAULT_IDENTIFIER_SYSTEM
from pfsync.load.transform import parse_reference
from pfsync.sandbox.run import Sandboxes, start_sandboxes

Json = dict[str, Any]
SOURCE_NAME = "default"


# ------------------------------------------------------------------------------------------------
# Sandboxes that survive restarts


@dataclass
class Rig:
    """Both sandboxes on fixed ports with a persistent state dir, and pfsync's environment for them."""

    root: Path
    data: Path
    sandboxes: Sandboxes
    restarts: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path, data: Path) -> Rig:
        sandboxes = start_sandboxes(data=data, state_dir=root / "sandboxes")
        return cls(root, data, sandboxes)

    @property
    def state_dir(self) -> Path:
        return self.root / "pfsync-state"

    @property
    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "MEDPLUM_", "PFSYNC_"))}
        return {
            **clean,
            **self.sandboxes.env,
            "PFSYNC_STATE_DIR": str(self.state_dir),
            "PFSYNC_LOG_FORMAT": "json",
            "NO_COLOR": "1",
            **self.extra_env,
        }

    def restart(self) -> None:
        """Stop both servers and start them again on the same ports and state dir (data kept)."""
        source_port = int(self.sandboxes.source.server_url.rsplit(":", 1)[1].split("/")[0])
        target_port = self.sandboxes.target.port
        self.sandboxes.stop()
        for attempt in range(50):
            try:
                self.sandboxes = start_sandboxes(data=self.data, state_dir=self.root / "sandboxes",
                                                 source_port=source_port, target_port=target_port)  # fmt: skip
                break
            except OSError:  # the port is still held by the closing socket
                if attempt == 49:
                    raise
                time.sleep(0.1)
        self.restarts += 1

    def stop(self) -> None:
        self.sandboxes.stop()


# ------------------------------------------------------------------------------------------------
# Kill points


@dataclass(frozen=True)
class KillPoint:
    """When to SIGKILL a `pfsync sync` run. `kind`: time, kickoff, status, download, writes or checkpoint;
    `frac` scales what the last completed run did (its duration, downloads or writes), so a kill lands
    inside the run whether it is the first full sync or a small incremental one."""

    kind: str
    frac: float
    restart_after: bool = False
    mutate_before: bool = False

    def resolve(self, last: RunWork) -> float:
        """The absolute trigger: seconds for "time", a count for the others."""
        if self.kind == "time":
            return round(self.frac * last.seconds, 3)
        if self.kind == "download":
            return max(1, round(self.frac * last.downloads))
        if self.kind == "writes":
            return max(1, round(self.frac * last.writes))
        return 1

    def label(self, n: float) -> str:
        return f"{self.kind}:{n:g}"


@dataclass
class RunWork:
    """What a completed run did: wall seconds, files downloaded, target writes."""

    seconds: float
    downloads: int
    writes: int


def plan_kill_points(rng: random.Random, count: int) -> list[KillPoint]:
    """Seeded kill points spread over every phase: export (kick-off, status polls), download,
    load (a share of the writes of a run), the checkpoint advance, and plain times."""
    kinds = ["time", "kickoff", "status", "download", "writes", "writes", "checkpoint", "time"]
    points = []
    for i in range(count):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        frac = round(rng.uniform(0.05, 0.95), 3)
        points.append(
            KillPoint(kind, frac, restart_after=rng.random() < 0.3, mutate_before=rng.random() < 0.3)
        )
    return points


@dataclass
class RunOutcome:
    label: str
    returncode: int
    killed: bool
    elapsed: float
    stderr_tail: str
    work: RunWork


def _transaction_time(state_dir: Path) -> object:
    """The checkpoint's transactionTime (it only moves when a run's data is fully loaded)."""
    path = state_dir / SOURCE_NAME / "checkpoint.json"
    try:
        return orjson.loads(path.read_bytes()).get("transactionTime")
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def _trigger(rig: Rig, kind: str, n: float) -> Callable[[float], bool]:
    source, target = rig.sandboxes.source, rig.sandboxes.target
    if kind == "time":
        return lambda elapsed: elapsed >= n
    if kind in ("kickoff", "status", "download"):
        base = source.stats.count(kind)
        return lambda _: source.stats.count(kind) - base >= n
    if kind == "writes":
        base = target.stats.writes
        return lambda _: target.stats.writes - base >= n
    if kind == "checkpoint":
        before = _transaction_time(rig.state_dir)
        return lambda _: _transaction_time(rig.state_dir) != before
    raise ValueError(kind)


def run_sync(
    rig: Rig, point: KillPoint | None = None, last: RunWork | None = None, timeout: float = 300.0
) -> RunOutcome:
    """One `pfsync sync` subprocess, SIGKILLed when `point` fires (never, if it is None)."""
    label = "clean"
    fire: Callable[[float], bool] = lambda _: False  # noqa: E731
    if point is not None:
        n = point.resolve(last or RunWork(60.0, 1, 1))
        label = point.label(n)
        fire = _trigger(rig, point.kind, n)
    downloads0 = rig.sandboxes.source.stats.count("download")
    writes0 = rig.sandboxes.target.stats.writes
    err_path = rig.root / "last-stderr.txt"
    started = time.monotonic()
    killed = False
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pfsync", "sync"], env=rig.env, stdout=subprocess.DEVNULL,
                                stderr=err)  # fmt: skip
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - started
                if fire(elapsed):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    proc.wait()
                    break
                if elapsed > timeout:
                    proc.kill()
                    proc.wait()
                    raise AssertionError(f"pfsync sync did not finish in {timeout:.0f} s")
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tail = err_path.read_bytes()[-3000:].decode(errors="replace")
    elapsed = time.monotonic() - started
    work = RunWork(elapsed, rig.sandboxes.source.stats.count("download") - downloads0,
                   rig.sandboxes.target.stats.writes - writes0)  # fmt: skip
    return RunOutcome(label, proc.returncode, killed, elapsed, tail, work)


# ------------------------------------------------------------------------------------------------
# Source mutations between runs


def _store(rig: Rig) -> Any:
    return rig.sandboxes.source.state.store


def source_resources(rig: Rig) -> Iterator[tuple[str, str, Json, bool]]:
    """(type, id, resource, in a patient compartment) of every live source resource."""
    practice = rig.sandboxes.source.practices[0]
    rows = _store(rig).db.execute(
        "SELECT type, id, json, patient IS NOT NULL FROM resources WHERE practice=? AND deleted_at IS NULL",
        (practice,),
    )
    for rtype, rid, blob, in_compartment in rows.fetchall():
        yield str(rtype), str(rid), orjson.loads(blob), bool(in_compartment)


def _referenced(rig: Rig) -> set[tuple[str | None, str]]:
    base = rig.sandboxes.source.base_url()
    found: set[tuple[str | None, str]] = set()
    for _, _, resource, _ in source_resources(rig):
        for ref in references_in(resource):
            parsed = parse_reference(ref, base)
            if parsed is not None:
                found.add((parsed.type, parsed.id))
    return found


def mutate_source(rig: Rig, rng: random.Random, tag: str) -> Counter[str]:
    """Change, add and delete a few source resources (deletes only of resources nobody references)."""
    source = rig.sandboxes.source
    live = [(t, i, r) for t, i, r, patient in source_resources(rig) if patient and t != "Group"]
    referenced = _referenced(rig)
    done: Counter[str] = Counter()
    for _rtype, _rid, resource in rng.sample(live, min(4, len(live))):
        resource.pop("meta", None)
        resource.setdefault("extension", []).append({"url": "https://pfsync.test/chaos", "valueString": tag})
        source.upsert(resource)
        done["changed"] += 1
    observations = [r for t, _, r in live if t == "Observation"]
    for template in rng.sample(observations, min(2, len(observations))):
        new = {k: v for k, v in template.items() if k != "meta"}
        new["id"] = f"chaos-{tag}-{done['added']}"
        source.upsert(new)
        done["added"] += 1
    leaves = [(t, i) for t, i, _ in live if (t, i) not in referenced and (None, i) not in referenced]
    for rtype, rid in rng.sample(leaves, min(2, len(leaves))):
        source.delete(rtype, rid)
        done["deleted"] += 1
    return done


# ------------------------------------------------------------------------------------------------
# Comparing the target with the source


def _system(rtype: str) -> str:
    return DEFAULT_IDENTIFIER_SYSTEM.format(type=rtype, type_lower=rtype.lower(), source=SOURCE_NAME)


def _source_id(resource: Json) -> str | None:
    system = _system(str(resource.get("resourceType")))
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == system:
            value = ident.get("value")
            return value if isinstance(value, str) else None
    return None


_ATTACHMENT_KEYS = ("url", "data", "size", "hash")


def _identifier_set(identifiers: list[Any]) -> list[Any]:
    """Identifiers as a sorted, de-duplicated list (pfsync adds its own once; order is not content)."""
    return [
        orjson.loads(b) for b in sorted({orjson.dumps(i, option=orjson.OPT_SORT_KEYS) for i in identifiers})
    ]


def _logical(node: Json) -> tuple[str, str] | None:
    """(type, source id) of a logical Reference pfsync wrote (identifier + type, no literal reference)."""
    ident, rtype = node.get("identifier"), node.get("type")
    if "reference" in node or not isinstance(ident, dict) or not isinstance(rtype, str):
        return None
    if ident.get("system") != _system(rtype) or not isinstance(ident.get("value"), str):
        return None
    return rtype, ident["value"]


def _comparable(
    node: Any, rewrite: Callable[[str], str], on_logical: Callable[[str, str], None] | None = None
) -> Any:
    """A resource without server-owned parts, with references in source terms, for equality.
    A logical reference counts as the literal one it stands for; `on_logical` is told about it."""
    if isinstance(node, dict):
        logical = _logical(node) if on_logical is not None else None
        if logical is not None and on_logical is not None:
            on_logical(*logical)
            node = {k: v for k, v in node.items() if k not in ("identifier", "type")}
            node["reference"] = f"{logical[0]}/{logical[1]}"
            return _comparable(node, lambda ref: ref)
        out = {}
        attachment = "contentType" in node and ("url" in node or "data" in node)
        for key, value in node.items():
            if key in ("id", "meta") or (attachment and key in _ATTACHMENT_KEYS):
                continue
            if key == "reference" and isinstance(value, str):
                out[key] = rewrite(value)
            else:
                out[key] = _comparable(value, rewrite, on_logical)
        return out
    if isinstance(node, list):
        return [_comparable(v, rewrite, on_logical) for v in node]
    return node


@dataclass
class Comparison:
    expected: int = 0
    found: int = 0
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)
    # logical references (identifier + type) to a resource that IS in the target: not upgraded yet
    logical_to_loaded: list[str] = field(default_factory=list)
    # logical references to a type that is not synced (e.g. Location): expected, not a problem
    logical_unsynced: int = 0

    def problems(self) -> dict[str, list[str]]:
        return {k: v[:10] for k, v in self.__dict__.items() if isinstance(v, list) and v}

    def loss_problems(self) -> dict[str, list[str]]:
        """Only what means lost, duplicated, stale or broken data (not pending logical upgrades)."""
        return {k: v for k, v in self.problems().items() if k != "logical_to_loaded"}

    @property
    def ok(self) -> bool:
        return not self.problems()


def compare(rig: Rig) -> Comparison:
    """Target vs source: missing, duplicated, extra, different content, dangling references."""
    source, target = rig.sandboxes.source, rig.sandboxes.target
    base = source.base_url()
    live = {(t, i): (r, p) for t, i, r, p in source_resources(rig) if t != "Group"}
    types = sorted({t for t, _ in live} | {"Binary"})
    by_identity: dict[tuple[str, str], list[Json]] = {}
    mid_to_sid: dict[tuple[str, str], str] = {}
    result = Comparison()
    for rtype in types:
        for resource in target.resources(rtype):
            sid = _source_id(resource)
            if sid is None:
                if rtype != "Binary":  # attachments copied into Binary carry no source identity
                    result.extra.append(f"{rtype}/{resource.get('id')} has no source identifier")
                continue
            by_identity.setdefault((rtype, sid), []).append(resource)
            mid_to_sid[(rtype, str(resource.get("id")))] = sid
    sid_types: dict[str, set[str]] = {}
    for rtype, sid in live:
        sid_types.setdefault(sid, set()).add(rtype)

    def source_terms(ref: str) -> str:
        parsed = parse_reference(ref, base)
        if parsed is None:
            return ref
        rtype = parsed.type or next(iter(sorted(sid_types.get(parsed.id, {"?"}))))
        return f"{rtype}/{parsed.id}"

    def target_terms(ref: str) -> str:
        rtype, _, mid = ref.partition("/")
        sid = mid_to_sid.get((rtype, mid))
        return f"{rtype}/{sid}" if sid is not None else f"{ref} (unknown to the source)"

    for (rtype, sid), (resource, in_compartment) in live.items():
        copies = by_identity.get((rtype, sid), [])
        referenced_or_exported = in_compartment or copies
        if not referenced_or_exported:
            continue  # outside every patient compartment and never referenced: not exported
        result.expected += 1
        if not copies:
            result.missing.append(f"{rtype}/{sid}")
            continue
        result.found += 1
        if len(copies) > 1:
            result.duplicates.append(f"{rtype}/{sid} x{len(copies)}")
        ours = {"system": _system(rtype), "value": sid}
        want_resource = {
            **resource,
            "identifier": _identifier_set([*(resource.get("identifier") or []), ours]),
        }
        got_resource = {**copies[0], "identifier": _identifier_set(copies[0].get("identifier") or [])}

        def on_logical(ltype: str, lsid: str, where: str = f"{rtype}/{sid}") -> None:
            if (ltype, lsid) in by_identity:
                result.logical_to_loaded.append(f"{where} -> {ltype}/{lsid}")
            else:
                result.logical_unsynced += 1

        want = _comparable(want_resource, source_terms)
        got = _comparable(got_resource, target_terms, on_logical)
        if want != got:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            result.different.append(f"{rtype}/{sid}: fields {diff}")
    for (rtype, sid), copies in by_identity.items():
        if (rtype, sid) not in live:
            result.extra.append(f"{rtype}/{sid} (deleted or unknown in the source) x{len(copies)}")
    result.dangling = check_references(target, types)
    return result


def queue_lines(rig: Rig, name: str) -> list[str]:
    path = rig.state_dir / SOURCE_NAME / name
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]
