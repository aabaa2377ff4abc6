"""The on-disk scratch tables of one `pfsync verify` run, and the SQL that reconciles them.

The issue: memory stays flat for 1M resources, so source ids, Medplum ids and references live in a
temporary SQLite file (deleted after the run), never in Python sets. Tables:

    src(type, sid, hash, fetched)          every resource of the source export, and (fetched = 1) the
                                           ones the loader fetched by reference that Medplum holds
    mp(type, mid, sid, updated, vid, tag, body)  every Medplum resource with our identifier system
    ref(type, mid, kind, ttype, tid)       references found in those Medplum resources
    seen(type, mid)                        reference targets outside `mp` that Medplum confirmed
    fix(type, sid, reason), gone(type, mid)  `--fix`: what to re-send, what was deleted
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pfsync.core.private import private_dir, private_sqlite

RefKind = Literal["literal", "logical", "unresolved"]

_SCHEMA = """
PRAGMA journal_mode=OFF;
PRAGMA synchronous=OFF;
PRAGMA temp_store=FILE;
PRAGMA cache_size=-16000;
CREATE TABLE src (type TEXT NOT NULL, sid TEXT NOT NULL, hash TEXT, fetched INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE INDEX src_sid ON src (sid);
CREATE TABLE mp (type TEXT NOT NULL, mid TEXT NOT NULL, sid TEXT NOT NULL, updated TEXT, vid TEXT, tag TEXT,
    body TEXT, PRIMARY KEY (type, sid, mid)) WITHOUT ROWID;
CREATE INDEX mp_mid ON mp (type, mid);
CREATE TABLE ref (type TEXT NOT NULL, mid TEXT NOT NULL, kind TEXT NOT NULL, ttype TEXT, tid TEXT NOT NULL);
CREATE INDEX ref_target ON ref (ttype, tid);
CREATE TABLE seen (type TEXT NOT NULL, mid TEXT NOT NULL, PRIMARY KEY (type, mid)) WITHOUT ROWID;
CREATE TABLE fix (type TEXT NOT NULL, sid TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE TABLE gone (type TEXT NOT NULL, mid TEXT NOT NULL, PRIMARY KEY (type, mid)) WITHOUT ROWID;
"""
_PAGE = 1000


class Scratch:
    """A throw-away SQLite file; `close()` removes it."""

    def __init__(self, directory: Path) -> None:
        private_dir(directory)
        self.path = directory / f".verify-{os.getpid()}-{id(self):x}.sqlite"
        self.path.unlink(missing_ok=True)
        private_sqlite(self.path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.executescript(_SCHEMA)
        self.db.execute("BEGIN")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        self.path.unlink(missing_ok=True)

    def commit(self) -> None:
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def analyze(self) -> None:
        """Table statistics, so the reconciliation joins use the indexes (no quadratic scans)."""
        self.commit()
        self.db.execute("ANALYZE")

    # ------------------------------------------------------------------ filling
    def add_source(self, rtype: str, sid: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO src (type, sid) VALUES (?, ?)", (rtype, sid))

    def add_fetched(self, rtype: str, sid: str) -> bool:
        """A resource the loader fetched by reference counts as the source's where Medplum holds it."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO src (type, sid, fetched) SELECT ?, ?, 1 "
            "WHERE EXISTS (SELECT 1 FROM mp WHERE type = ? AND sid = ?)",
            (rtype, sid, rtype, sid),
        )
        return cur.rowcount == 1

    def set_source_hash(self, rtype: str, sid: str, content_hash: str) -> None:
        self.db.execute("UPDATE src SET hash = ? WHERE type = ? AND sid = ?", (content_hash, rtype, sid))

    def add_medplum(
        self,
        rtype: str,
        mid: str,
        sid: str,
        updated: str | None,
        vid: str | None,
        tag: str | None,
        body: str | None,
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO mp VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rtype, mid, sid, updated, vid, tag, body),
        )

    def add_ref(self, rtype: str, mid: str, kind: RefKind, ttype: str | None, tid: str) -> None:
        self.db.execute("INSERT INTO ref VALUES (?, ?, ?, ?, ?)", (rtype, mid, kind, ttype, tid))

    def add_seen(self, rtype: str, mid: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (rtype, mid))

    # ------------------------------------------------------------------ lookups
    def types(self) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT type FROM src UNION SELECT DISTINCT type FROM mp ORDER BY 1")
        return [r[0] for r in rows]

    def medplum_id(self, rtype: str, sid: str) -> str | None:
        """The Medplum id of a source identity (the oldest-updated one if duplicated)."""
        row = self.db.execute(
            "SELECT mid FROM mp WHERE type = ? AND sid = ? ORDER BY updated, mid LIMIT 1", (rtype, sid)
        ).fetchone()
        return None if row is None else str(row[0])

    def source_types_of(self, sid: str) -> list[str]:
        """Types of a source id (a bare `urn:uuid:<id>` names a resource by id alone)."""
        return [r[0] for r in self.db.execute("SELECT type FROM src WHERE sid = ?", (sid,))]

    def in_source(self, rtype: str, sid: str) -> bool:
        """Whether the export holds this identity (fetched ones are not in it: nothing to re-send)."""
        return (
            self.db.execute(
                "SELECT 1 FROM src WHERE type = ? AND sid = ? AND fetched = 0", (rtype, sid)
            ).fetchone()
            is not None
        )

    def referrer(self, rtype: str, mid: str, sid: str) -> str | None:
        """`Type/id` of one other Medplum resource that refers to this one (literally by its Medplum
        id, or logically by its source id), if any."""
        row = self.db.execute(
            "SELECT r.type, r.mid FROM ref r WHERE r.ttype = ? AND ((r.kind = 'literal' AND r.tid = ?) "
            "OR (r.kind != 'literal' AND r.tid = ?)) AND NOT (r.type = ? AND r.mid = ?) LIMIT 1",
            (rtype, mid, sid, rtype, mid),
        ).fetchone()
        return None if row is None else f"{row[0]}/{row[1]}"

    def unknown_targets(self) -> Iterator[tuple[str, list[str]]]:
        """Literal reference targets neither in `mp` nor in `seen`, grouped by type, in pages."""
        rows = self.db.execute(
            "SELECT DISTINCT r.ttype, r.tid FROM ref r WHERE r.kind = 'literal' "
            "AND NOT EXISTS (SELECT 1 FROM mp m WHERE m.type = r.ttype AND m.mid = r.tid) "
            "AND NOT EXISTS (SELECT 1 FROM seen s WHERE s.type = r.ttype AND s.mid = r.tid) "
            "ORDER BY r.ttype, r.tid"
        ).fetchall()  # distinct dangling targets only: a handful on a healthy target
        current: str | None = None
        chunk: list[str] = []
        for ttype, tid in rows:
            if ttype != current or len(chunk) >= _PAGE:
                if current is not None and chunk:
                    yield current, chunk
                current, chunk = ttype, []
            chunk.append(tid)
        if current is not None and chunk:
            yield current, chunk

    # ------------------------------------------------------------------ reconciliation
    def counts(self) -> dict[str, dict[str, int]]:
        """Per type: source, medplum, present, missing, duplicated, extra, dangling, logical, drift."""
        out: dict[str, dict[str, int]] = {}

        def put(sql: str, name: str) -> None:
            for rtype, n in self.db.execute(sql):
                out.setdefault(rtype, {})[name] = int(n)

        put("SELECT type, count(*) FROM src GROUP BY type", "source")
        put("SELECT type, count(DISTINCT mid) FROM mp GROUP BY type", "medplum")
        put("SELECT s.type, count(*) FROM src s WHERE EXISTS (SELECT 1 FROM mp m WHERE m.type = s.type "
            "AND m.sid = s.sid) GROUP BY s.type", "present")  # fmt: skip
        put("SELECT s.type, count(*) FROM src s WHERE NOT EXISTS (SELECT 1 FROM mp m WHERE m.type = s.type "
            "AND m.sid = s.sid) GROUP BY s.type", "missing")  # fmt: skip
        put("SELECT type, count(*) FROM (SELECT type, sid FROM mp GROUP BY type, sid "
            "HAVING count(DISTINCT mid) > 1) GROUP BY type", "duplicated")  # fmt: skip
        put("SELECT m.type, count(DISTINCT m.mid) FROM mp m WHERE NOT EXISTS (SELECT 1 FROM src s "
            "WHERE s.type = m.type AND s.sid = m.sid) GROUP BY m.type", "extra")  # fmt: skip
        put(f"SELECT type, count(*) FROM ({self._dangling_sql()}) GROUP BY type", "dangling")
        put("SELECT type, count(*) FROM ref WHERE kind = 'logical' GROUP BY type", "logical")
        put(f"SELECT type, count(*) FROM ({self._drift_sql()}) GROUP BY type", "drift")
        return out

    @staticmethod
    def _dangling_sql() -> str:
        return (
            "SELECT r.type, r.mid, r.kind, r.ttype, r.tid FROM ref r WHERE r.kind != 'literal' OR ("
            "NOT EXISTS (SELECT 1 FROM mp m WHERE m.type = r.ttype AND m.mid = r.tid) "
            "AND NOT EXISTS (SELECT 1 FROM seen s WHERE s.type = r.ttype AND s.mid = r.tid))"
        )

    @staticmethod
    def _drift_sql() -> str:
        return (
            "SELECT s.type, s.sid, m.mid FROM src s JOIN mp m ON m.type = s.type AND m.sid = s.sid "
            "WHERE s.hash IS NOT NULL AND (m.body IS NULL OR m.body != s.hash) "
            "AND NOT EXISTS (SELECT 1 FROM mp d WHERE d.type = m.type AND d.sid = m.sid AND d.mid != m.mid)"
        )

    def missing(self) -> Iterator[tuple[str, str]]:
        yield from self.db.execute(
            "SELECT s.type, s.sid FROM src s WHERE NOT EXISTS (SELECT 1 FROM mp m WHERE m.type = s.type "
            "AND m.sid = s.sid) ORDER BY s.type, s.sid"
        )

    def duplicated(self) -> Iterator[tuple[str, str, list[str]]]:
        """(type, sid, Medplum ids oldest-updated first) for every identity held more than once."""
        rows = self.db.execute(
            "SELECT type, sid, group_concat(mid, ' ') FROM (SELECT type, sid, mid FROM mp "
            "WHERE (type, sid) IN (SELECT type, sid FROM mp GROUP BY type, sid HAVING count(DISTINCT mid) > 1) "
            "ORDER BY type, sid, updated, mid) GROUP BY type, sid ORDER BY type, sid"
        )
        for rtype, sid, mids in rows:
            yield rtype, sid, list(dict.fromkeys(str(mids).split(" ")))

    def extra(self) -> Iterator[tuple[str, str, str]]:
        yield from self.db.execute(
            "SELECT DISTINCT m.type, m.sid, m.mid FROM mp m WHERE NOT EXISTS (SELECT 1 FROM src s "
            "WHERE s.type = m.type AND s.sid = m.sid) ORDER BY m.type, m.sid, m.mid"
        )

    def dangling(self) -> Iterator[tuple[str, str, str, str | None, str]]:
        """(type, mid, kind, target type, target id) of each reference that does not resolve."""
        yield from self.db.execute(self._dangling_sql() + " ORDER BY r.type, r.mid, r.tid")

    def drift(self) -> Iterator[tuple[str, str, str]]:
        """(type, sid, mid) whose content differs (duplicated identities are reported as such)."""
        yield from self.db.execute(self._drift_sql() + " ORDER BY s.type, s.sid")

    def sid_of(self, rtype: str, mid: str) -> str | None:
        """The source id a Medplum resource carries (first one if several)."""
        row = self.db.execute(
            "SELECT sid FROM mp WHERE type = ? AND mid = ? LIMIT 1", (rtype, mid)
        ).fetchone()
        return None if row is None else str(row[0])

    # ------------------------------------------------------------------ --fix bookkeeping
    def add_fix(self, rtype: str, sid: str, reason: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO fix VALUES (?, ?, ?)", (rtype, sid, reason))

    def fix_missing(self) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO fix SELECT s.type, s.sid, 'missing' FROM src s WHERE NOT EXISTS "
            "(SELECT 1 FROM mp m WHERE m.type = s.type AND m.sid = s.sid)"
        )

    def fix_drift(self) -> None:
        self.db.execute(
            f"INSERT OR IGNORE INTO fix SELECT type, sid, 'content drift' FROM ({self._drift_sql()})"
        )

    def fixes(self) -> Iterator[tuple[str, str, str]]:
        """(type, sid, reason) to re-send, read in pages (safe while other tables change)."""
        last = ("", "")
        while True:
            page = self.db.execute(
                "SELECT type, sid, reason FROM fix WHERE (type, sid) > (?, ?) ORDER BY type, sid LIMIT ?",
                (*last, _PAGE),
            ).fetchall()
            if not page:
                return
            yield from page
            last = (page[-1][0], page[-1][1])

    def fix_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM fix").fetchone()[0])

    def is_fix(self, rtype: str, sid: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM fix WHERE type = ? AND sid = ?", (rtype, sid)).fetchone()
            is not None
        )

    def add_gone(self, rtype: str, mid: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO gone VALUES (?, ?)", (rtype, mid))

    def referrers_of_gone(self) -> list[tuple[str, str]]:
        """(type, sid) of source resources whose Medplum copy points at a deleted resource."""
        return list(
            self.db.execute(
                "SELECT DISTINCT m.type, m.sid FROM ref r JOIN gone g ON g.type = r.ttype AND g.mid = r.tid "
                "JOIN mp m ON m.type = r.type AND m.mid = r.mid "
                "WHERE NOT EXISTS (SELECT 1 FROM gone x WHERE x.type = r.type AND x.mid = r.mid)"
            )
        )

    def kept(self) -> Iterator[tuple[str, str, str, str | None, str | None]]:
        """(type, sid, mid, vid, tag) per identity still in Medplum after the deletions (oldest kept)."""
        rows = self.db.execute(
            "SELECT type, sid, mid, vid, tag FROM mp m WHERE NOT EXISTS (SELECT 1 FROM gone g "
            "WHERE g.type = m.type AND g.mid = m.mid) ORDER BY type, sid, updated DESC, mid DESC"
        )
        last: tuple[str, str] | None = None
        pending: tuple[str, str, str, str | None, str | None] | None = None
        for row in rows:  # the last row of each identity wins: the oldest-updated one
            if last is not None and (row[0], row[1]) != last and pending is not None:
                yield pending
            last, pending = (row[0], row[1]), row
        if pending is not None:
            yield pending
