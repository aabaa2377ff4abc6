"""The records `pfsync verify` returns: counts per type, the findings behind them, and fix actions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Category = Literal["missing", "duplicated", "extra", "dangling", "drift"]
CATEGORIES: tuple[Category, ...] = ("missing", "duplicated", "extra", "dangling", "drift")
ActionKind = Literal["resend", "delete_duplicate", "delete_extra", "keep_extra"]


@dataclass(frozen=True)
class VerifyOptions:
    """What `pfsync verify` checks and repairs."""

    content: bool = False
    fix: bool = False
    fix_extras: bool = False
    dry_run: bool = False
    limit: int | None = None  # findings kept per category (None: all, for --json)
    page_size: int = 1000


@dataclass(frozen=True)
class TypeCounts:
    """One row of the report: a resource type (or "total")."""

    type: str
    source: int = 0
    medplum: int = 0
    present: int = 0
    missing: int = 0
    duplicated: int = 0
    extra: int = 0
    dangling: int = 0
    logical: int = 0  # logical references still waiting for their target (counted in dangling too)
    drift: int = 0

    def __add__(self, other: TypeCounts) -> TypeCounts:
        names = [f for f in asdict(self) if f != "type"]
        return TypeCounts(self.type, **{n: getattr(self, n) + getattr(other, n) for n in names})


@dataclass(frozen=True)
class Finding:
    """One problem. `sid` is the source id, `mid` the Medplum id; `target` a dangling reference's target."""

    category: Category
    type: str
    sid: str | None = None
    mid: str | None = None
    mids: tuple[str, ...] = ()
    target: str | None = None
    detail: str | None = None

    def label(self) -> str:
        """How the table shows it."""
        if self.category == "duplicated":
            return f"{self.type} {self.sid}: {', '.join(self.mids)}"
        if self.category == "dangling":
            who = f"{self.type}/{self.mid}" + (f" ({self.sid})" if self.sid else "")
            return f"{who} -> {self.target} [{self.detail}]"
        ids = [x for x in (self.sid, self.mid) if x]
        return f"{self.type} " + " / ".join(ids)


@dataclass(frozen=True)
class Action:
    """A repair `--fix` made (or, with `--dry-run`, would make)."""

    kind: ActionKind
    type: str
    sid: str | None
    mid: str | None = None
    reason: str = ""
    done: bool = False
    error: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    """What Medplum holds compared with one source export."""

    source: str
    export_dir: str
    types: tuple[TypeCounts, ...]
    findings: tuple[Finding, ...]  # up to `limit` per category (all when the limit was None)
    content_checked: bool
    extras_checked: bool  # False for an incremental (`_since`) export: it does not list everything
    quota_used: int
    requests: int
    throttled: int
    bad_lines: int = 0
    actions: tuple[Action, ...] = ()
    dry_run: bool = False
    after: VerifyReport | None = None  # the verification re-run after `--fix` applied its actions
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> TypeCounts:
        out = TypeCounts("total")
        for row in self.types:
            out = out + row
        return out

    @property
    def final(self) -> VerifyReport:
        """The report that decides the outcome: the re-run after a fix, else this one."""
        return self.after if self.after is not None else self

    @property
    def ok(self) -> bool:
        """Nothing missing, duplicated or dangling (extras and drift are reported, not failures)."""
        t = self.final.total
        return t.missing == 0 and t.duplicated == 0 and t.dangling == 0

    def of(self, category: Category) -> list[Finding]:
        return [f for f in self.findings if f.category == category]

    def to_json(self) -> dict[str, Any]:
        total = self.total
        data: dict[str, Any] = {
            "ok": self.ok,
            "source": self.source,
            "exportDir": self.export_dir,
            "contentChecked": self.content_checked,
            "extrasChecked": self.extras_checked,
            "quotaUsed": self.quota_used,
            "requests": self.requests,
            "throttled": self.throttled,
            "badLines": self.bad_lines,
            "total": {k: v for k, v in asdict(total).items() if k != "type"},
            "types": {row.type: {k: v for k, v in asdict(row).items() if k != "type"} for row in self.types},
            "findings": {c: [_finding_json(f) for f in self.of(c)] for c in CATEGORIES},
            "notes": list(self.notes),
        }
        if self.actions or self.dry_run:
            data["dryRun"] = self.dry_run
            data["actions"] = [{k: v for k, v in asdict(a).items() if v is not None} for a in self.actions]
        if self.after is not None:
            data["after"] = self.after.to_json()
        return data


def _finding_json(f: Finding) -> dict[str, Any]:
    out: dict[str, Any] = {"type": f.type}
    for key in ("sid", "mid", "target", "detail"):
        value = getattr(f, key)
        if value is not None:
            out[key] = value
    if f.mids:
        out["mids"] = list(f.mids)
    return out
