"""Resources held on disk in the id map's file: deferred ones waiting for reference targets, and
ones written with logical references, waiting to be upgraded.

The tables live in `idmap.sqlite` next to the map (pfsync.load.idmap owns the connection, its
transaction and the `map` table these queries read); this module owns:

- `deferred`: resources held back until their reference targets have Medplum ids, and `waits`:
  which targets each of them still waits for (type ANY_TYPE: a bare `urn:uuid:<id>` whose type
  is not known yet);
- `logical`: resources written with logical references, to upgrade once the targets arrive, and
  `logical_waits`: the targets each names logically.

Finding the deferred rows whose targets have all arrived (`ready`) looks only at what changed
since the last call: the rows held since then and the waits on targets that got a Medplum id since
then (both noted in TEMP tables, on disk like the rest, so memory stays flat); rows that have no
wait left go to a TEMP table of ready rows, which `ready` hands out page by page. A whole pass over
the held rows happens once per run, the first time, for rows left by an earlier run.

Holds and releases are buffered and written with `executemany` when the id map flushes (in its
open transaction, committed at its `commit`), never one statement per resource.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deferred (type TEXT NOT NULL, sid TEXT NOT NULL, file TEXT, line INTEGER,
    raw BLOB NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
-- writable() joins waits to deferred by source id alone: without this index that join scanned
-- every held row per wait row, quadratic at finish() of a large first sync.
CREATE INDEX IF NOT EXISTS deferred_sid ON deferred (sid);
CREATE TABLE IF NOT EXISTS waits (type TEXT NOT NULL, sid TEXT NOT NULL, ttype TEXT NOT NULL,
    tsid TEXT NOT NULL, PRIMARY KEY (type, sid, ttype, tsid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS waits_target ON waits (ttype, tsid);
CREATE TABLE IF NOT EXISTS logical (type TEXT NOT NULL, sid TEXT NOT NULL, file TEXT, line INTEGER,
    raw BLOB NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
-- The targets each logical row names logically: only rows with a target that has arrived are
-- looked at again (re-preparing every logical row cost every later run, and most never resolve:
-- a type the source refuses stays logical for good). Rows from before this table have none.
CREATE TABLE IF NOT EXISTS logical_waits (type TEXT NOT NULL, sid TEXT NOT NULL, ttype TEXT NOT NULL,
    tsid TEXT NOT NULL, PRIMARY KEY (type, sid, ttype, tsid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS logical_waits_target ON logical_waits (ttype, tsid);
-- This connection's bookkeeping for `ready` (module docstring), gone when it closes.
CREATE TEMP TABLE IF NOT EXISTS held_new (type TEXT NOT NULL, sid TEXT NOT NULL,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS arrived (type TEXT NOT NULL, sid TEXT NOT NULL,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS unwaited (type TEXT NOT NULL, sid TEXT NOT NULL,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS ready_rows (type TEXT NOT NULL, sid TEXT NOT NULL,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
"""
TABLES = ("deferred", "logical")
_WAITS = {"deferred": "waits", "logical": "logical_waits"}  # the targets each held row waits for
# A waited-for target whose type is unknown (a `urn:uuid:<id>` no input has named yet).
ANY_TYPE = ""
_PAGE = 500
# A wait is over when its target has a Medplum id: same type, or any type for ANY_TYPE.
_ARRIVED = "m.mid IS NOT NULL AND m.sid = w.tsid AND (w.ttype = '' OR m.type = w.ttype)"


@dataclass(frozen=True)
class Held:
    """A resource kept on disk (deferred or logical) with where it came from."""

    type: str
    sid: str
    file: str | None
    line: int | None
    raw: bytes


def _held(rows: Iterable[tuple[str, str, str | None, int | None, bytes]]) -> list[Held]:
    """Rows of (type, sid, file, line, raw) as Held."""
    return [Held(t, s, f, line, bytes(raw)) for t, s, f, line, raw in rows]


class Holds:
    """The held tables of one id map file. `flush` writes every buffered change of the id map
    (this object's buffer included: `write_buffer`), `begin` opens its transaction."""

    def __init__(
        self, db: sqlite3.Connection, *, flush: Callable[[], None], begin: Callable[[], None]
    ) -> None:
        self._db = db
        self._flush = flush
        self._begin = begin
        db.executescript(_SCHEMA)
        self._buffer: dict[tuple[str, str, str], tuple[Held | None, tuple[tuple[str, str], ...]]] = {}
        # Rows left by an earlier run: their targets may have arrived since, unnoticed by this
        # connection's TEMP tables, so the first `ready` looks at every one of them.
        self._scan_all = db.execute("SELECT 1 FROM deferred LIMIT 1").fetchone() is not None
        self._tracking = self._scan_all  # arrivals matter only once something is deferred
        # Rows per table, counted once and then kept by write_buffer: the write path asks at every
        # settle point, and count(*) reads the whole table.
        self._counts = {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}

    def drop_logical(self) -> None:
        """Another Medplum server: the logical rows name ids of the old one (deferred rows stay:
        they have not been written anywhere yet)."""
        self._db.executescript("DELETE FROM logical; DELETE FROM logical_waits;")
        self._counts["logical"] = 0

    # -- changes, buffered
    def hold(self, table: str, item: Held, waits: Iterable[tuple[str, str]] = ()) -> None:
        """Keep a resource on disk; `waits`: the (type, sid) targets it waits for (deferred: type
        ANY_TYPE when only the id is known; logical: the targets named logically)."""
        assert table in TABLES
        self._buffer[(table, item.type, item.sid)] = (item, tuple(waits))
        if table == "deferred":
            self._tracking = True

    def release(self, table: str, rtype: str, sid: str) -> None:
        assert table in TABLES
        self._buffer[(table, rtype, sid)] = (None, ())

    def arrived(self, keys: list[tuple[str, str]]) -> None:
        """These identities were just written to the map with a Medplum id (by the id map's flush)."""
        if self._tracking and keys:
            self._db.executemany("INSERT OR IGNORE INTO temp.arrived VALUES (?, ?)", keys)

    def write_buffer(self) -> None:
        """Write the buffered holds and releases (in the id map's open transaction)."""
        if not self._buffer:
            return
        self._begin()
        db = self._db
        for table in TABLES:
            keys = [(t, s) for (tb, t, s) in self._buffer if tb == table]
            if not keys:
                continue
            removed = db.executemany(f"DELETE FROM {table} WHERE type = ? AND sid = ?", keys).rowcount
            db.executemany(f"DELETE FROM {_WAITS[table]} WHERE type = ? AND sid = ?", keys)
            items = [(item, waits) for (tb, _, _), (item, waits) in self._buffer.items()
                     if tb == table and item is not None]  # fmt: skip
            db.executemany(
                f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?)",
                [(i.type, i.sid, i.file, i.line, i.raw) for i, _ in items],
            )
            self._counts[table] += len(items) - removed
            db.executemany(
                f"INSERT OR IGNORE INTO {_WAITS[table]} VALUES (?, ?, ?, ?)",
                [(i.type, i.sid, tt, ts) for i, waits in items for tt, ts in waits],
            )
            if table == "deferred":
                # A changed row is looked at again by the next `ready`, from scratch.
                db.executemany("DELETE FROM temp.ready_rows WHERE type = ? AND sid = ?", keys)
                db.executemany(
                    "INSERT OR IGNORE INTO temp.held_new VALUES (?, ?)", [(i.type, i.sid) for i, _ in items]
                )
        self._buffer = {}

    # -- reading
    def held(self, table: str) -> Iterator[Held]:
        """A snapshot of a held table, read in pages so memory stays flat."""
        assert table in TABLES
        return self._pages(f"SELECT type, sid, file, line, raw FROM {table} WHERE (type, sid) > (?, ?)")

    def upgradable(self) -> Iterator[Held]:
        """Logical rows that may resolve now: one of their logical targets has a Medplum id (or
        the row predates `logical_waits`), read in pages like `held`."""
        return self._pages(
            "SELECT type, sid, file, line, raw FROM logical l WHERE (type, sid) > (?, ?) AND ("
            "EXISTS (SELECT 1 FROM logical_waits w JOIN map m ON m.type = w.ttype AND m.sid = w.tsid "
            "AND m.mid IS NOT NULL WHERE w.type = l.type AND w.sid = l.sid) "
            "OR NOT EXISTS (SELECT 1 FROM logical_waits w WHERE w.type = l.type AND w.sid = l.sid))"
        )

    def _pages(self, query: str) -> Iterator[Held]:
        """The rows of `query` (type, sid, file, line, raw, bounded by `(type, sid) > (?, ?)`), a
        page at a time, each page asked after the previous one is used (rows may change meanwhile)."""
        self._flush()
        last: tuple[str, str] = ("", "")
        while True:
            page = self._db.execute(query + f" ORDER BY type, sid LIMIT {_PAGE}", last).fetchall()
            if not page:
                return
            yield from _held(page)
            last = (page[-1][0], page[-1][1])

    def count(self, table: str) -> int:
        assert table in TABLES
        self._flush()
        return self._counts[table]

    def is_held(self, table: str, rtype: str, sid: str) -> bool:
        assert table in TABLES
        self._flush()
        q = f"SELECT 1 FROM {table} WHERE type = ? AND sid = ?"
        return self._db.execute(q, (rtype, sid)).fetchone() is not None

    def ready(self, limit: int = 1000) -> list[Held]:
        """Deferred resources whose every waited-for target now has a Medplum id, at most `limit`,
        in (type, sid) order (module docstring: only what changed since the last call is looked at)."""
        self._flush()
        self._begin()
        self._note_ready()
        rows = self._db.execute(
            "SELECT d.type, d.sid, d.file, d.line, d.raw FROM temp.ready_rows r JOIN deferred d "
            "ON d.type = r.type AND d.sid = r.sid ORDER BY r.type, r.sid LIMIT ?",
            (limit,),
        ).fetchall()
        # Handed out: the caller releases them (a row held again comes back through held_new).
        self._db.executemany(
            "DELETE FROM temp.ready_rows WHERE type = ? AND sid = ?", [(r[0], r[1]) for r in rows]
        )
        return _held(rows)

    def _note_ready(self) -> None:
        """Drop the waits that are over among what changed, and move the rows left with none to
        temp.ready_rows. Every statement reads only the changed keys (and the indexes they hit)."""
        db = self._db
        if self._scan_all:
            self._scan_all = False
            db.execute(f"DELETE FROM waits AS w WHERE EXISTS (SELECT 1 FROM map m WHERE {_ARRIVED})")
            db.execute("INSERT OR IGNORE INTO temp.unwaited SELECT type, sid FROM deferred")
            db.execute("DELETE FROM temp.arrived")
        else:
            # Arrivals undone since (`IdMap.forget`) end no wait.
            db.execute(
                "DELETE FROM temp.arrived AS a WHERE NOT EXISTS (SELECT 1 FROM map m "
                "WHERE m.type = a.type AND m.sid = a.sid AND m.mid IS NOT NULL)"
            )
            # CROSS JOIN: the arrivals drive the loop (the planner, without statistics, would scan waits).
            for typed in ("w.ttype = a.type AND w.tsid = a.sid", "w.ttype = '' AND w.tsid = a.sid"):
                db.execute(
                    f"INSERT OR IGNORE INTO temp.unwaited SELECT w.type, w.sid FROM temp.arrived a CROSS JOIN waits w ON {typed}"
                )
            db.execute("DELETE FROM waits WHERE (ttype, tsid) IN (SELECT type, sid FROM temp.arrived)")
            db.execute("DELETE FROM waits WHERE ttype = '' AND tsid IN (SELECT sid FROM temp.arrived)")
            db.execute("DELETE FROM temp.arrived")
            # Rows held since the last call: a target may have arrived before they were written.
            db.execute(
                "DELETE FROM waits AS w WHERE (w.type, w.sid) IN (SELECT type, sid FROM temp.held_new) "
                f"AND EXISTS (SELECT 1 FROM map m WHERE {_ARRIVED})"
            )
            db.execute("INSERT OR IGNORE INTO temp.unwaited SELECT type, sid FROM temp.held_new")
        db.execute("DELETE FROM temp.held_new")
        db.execute(
            "INSERT OR IGNORE INTO temp.ready_rows SELECT u.type, u.sid FROM temp.unwaited u WHERE "
            "EXISTS (SELECT 1 FROM deferred d WHERE d.type = u.type AND d.sid = u.sid) "
            "AND NOT EXISTS (SELECT 1 FROM waits w WHERE w.type = u.type AND w.sid = u.sid)"
        )
        db.execute("DELETE FROM temp.unwaited")

    def writable(self, limit: int = 1000) -> list[Held]:
        """Deferred resources that wait for no other deferred resource (only for targets that will
        not arrive in this run): written now, with logical references to those targets."""
        self._flush()
        rows = self._db.execute(
            "SELECT type, sid, file, line, raw FROM deferred d WHERE NOT EXISTS (SELECT 1 FROM waits w "
            "JOIN deferred d2 ON d2.sid = w.tsid AND (w.ttype = '' OR d2.type = w.ttype) "
            "WHERE w.type = d.type AND w.sid = d.sid) ORDER BY type, sid LIMIT ?",
            (limit,),
        )
        return _held(rows)

    def missing_targets(self) -> dict[str, list[str]]:
        """Waited-for targets (type known) with no Medplum id that are not held either: after a
        drain, nothing of this run's input brings them (a row without an id may be from an earlier,
        interrupted run). type -> source ids."""
        self._flush()
        out: dict[str, list[str]] = {}
        for t, s in self._db.execute(
            "SELECT DISTINCT ttype, tsid FROM waits WHERE ttype != '' AND NOT EXISTS "
            "(SELECT 1 FROM map m WHERE m.type = waits.ttype AND m.sid = waits.tsid AND m.mid IS NOT NULL) "
            "AND NOT EXISTS (SELECT 1 FROM deferred d WHERE d.type = waits.ttype AND d.sid = waits.tsid) "
            "ORDER BY ttype, tsid"
        ):
            out.setdefault(t, []).append(s)
        return out

    def unknown_ids(self) -> list[str]:
        """Waited-for `urn:uuid` ids with no Medplum id under any type and not held (see missing_targets)."""
        self._flush()
        rows = self._db.execute(
            "SELECT DISTINCT tsid FROM waits WHERE ttype = '' AND NOT EXISTS "
            "(SELECT 1 FROM map m WHERE m.sid = waits.tsid AND m.mid IS NOT NULL) AND NOT EXISTS "
            "(SELECT 1 FROM deferred d WHERE d.sid = waits.tsid) ORDER BY tsid"
        )
        return [str(r[0]) for r in rows]
