"""SQLite storage for the target sandbox: current versions, history, an identifier index, Binary bytes.

Built for ingest speed (docs/medplum.md "Measured on a real server": the sandbox must never be the loader's bottleneck):
one connection behind a lock, WAL on files, one transaction per batch, and identifiers in a side
table indexed by (type, value, system) so a conditional PUT's lookup is one index probe.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

from pfsync.sandbox.target.common import Json

_CACHE_KIB = 256 * 1024  # SQLite's page cache, allocated as it fills (see Store.__init__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL, id TEXT NOT NULL, vid TEXT NOT NULL, ts TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0, content BLOB, PRIMARY KEY (type, id));
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, id TEXT NOT NULL, vid TEXT NOT NULL,
    ts TEXT NOT NULL, deleted INTEGER NOT NULL, content BLOB);
CREATE INDEX IF NOT EXISTS history_res ON history (type, id);
CREATE TABLE IF NOT EXISTS ident (type TEXT NOT NULL, value TEXT NOT NULL, system TEXT NOT NULL, id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ident_tvs ON ident (type, value, system);
CREATE INDEX IF NOT EXISTS ident_id ON ident (type, id);
CREATE TABLE IF NOT EXISTS binaries (id TEXT PRIMARY KEY, content_type TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Row:
    type: str
    id: str
    vid: str
    ts: str
    deleted: bool
    resource: Json | None


def _row(r: tuple[str, str, str, str, int, bytes | None]) -> Row:
    return Row(r[0], r[1], r[2], r[3], bool(r[4]), orjson.loads(r[5]) if r[5] else None)


class Store:
    """All sandbox state. Thread-safe: every call runs under one re-entrant lock."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.RLock()
        target = str(path) if path is not None else ":memory:"
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            # A sandbox survives a crash of its process (the OS has the pages), never needs to
            # survive one of the OS: no fsync at WAL checkpoints. And a page cache that holds the
            # indexes of a large practice: with SQLite's default 2 MB, each write's four index
            # inserts (random uuid keys) missed the cache more as the store grew, and ingest fell
            # from 11k to 8k writes/s of CPU between 50k and 300k resources (docs/BENCHMARKS.md).
            self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._db.executescript(_SCHEMA)
        self._depth = 0

    def close(self) -> None:
        with self.lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction (nested calls join the outer one): a whole batch commits at once."""
        with self.lock:
            self._depth += 1
            if self._depth == 1:
                self._db.execute("BEGIN")
            try:
                yield
            except BaseException:
                if self._depth == 1:
                    self._db.execute("ROLLBACK")
                raise
            else:
                if self._depth == 1:
                    self._db.execute("COMMIT")
            finally:
                self._depth -= 1

    # ------------------------------------------------------------------ resources
    def read(self, rtype: str, rid: str) -> Row | None:
        with self.lock:
            r = self._db.execute(
                "SELECT type, id, vid, ts, deleted, content FROM resources WHERE type=? AND id=?",
                (rtype, rid),
            ).fetchone()
        return _row(r) if r else None

    def write(self, resource: Json) -> None:
        """Store a new current version (resource carries id and meta.versionId/lastUpdated)."""
        rtype, rid = resource["resourceType"], resource["id"]
        vid, ts = resource["meta"]["versionId"], resource["meta"]["lastUpdated"]
        blob = orjson.dumps(resource)
        idents = [
            (rtype, str(i.get("value", "")), str(i.get("system", "")), rid)
            for i in resource.get("identifier") or []
            if isinstance(i, dict)
        ]
        with self.transaction():
            cur = self._db.execute(
                "UPDATE resources SET vid=?, ts=?, deleted=0, content=? WHERE type=? AND id=?",
                (vid, ts, blob, rtype, rid),
            )
            if cur.rowcount == 0:
                self._db.execute("INSERT INTO resources VALUES (?,?,?,?,0,?)", (rtype, rid, vid, ts, blob))
            else:
                self._db.execute("DELETE FROM ident WHERE type=? AND id=?", (rtype, rid))
            self._db.execute(
                "INSERT INTO history (type, id, vid, ts, deleted, content) VALUES (?,?,?,?,0,?)",
                (rtype, rid, vid, ts, blob),
            )
            if idents:
                self._db.executemany("INSERT INTO ident VALUES (?,?,?,?)", idents)

    def mark_deleted(self, rtype: str, rid: str, vid: str, ts: str) -> None:
        with self.transaction():
            self._db.execute(
                "UPDATE resources SET vid=?, ts=?, deleted=1, content=NULL WHERE type=? AND id=?",
                (vid, ts, rtype, rid),
            )
            self._db.execute("DELETE FROM ident WHERE type=? AND id=?", (rtype, rid))
            self._db.execute(
                "INSERT INTO history (type, id, vid, ts, deleted, content) VALUES (?,?,?,?,1,NULL)",
                (rtype, rid, vid, ts),
            )

    def history(self, rtype: str, rid: str) -> list[Row]:
        """All versions, newest first (docs/medplum.md, recorded case 42)."""
        with self.lock:
            rows = self._db.execute(
                "SELECT type, id, vid, ts, deleted, content FROM history "
                "WHERE type=? AND id=? ORDER BY seq DESC",
                (rtype, rid),
            ).fetchall()
        return [_row(r) for r in rows]

    def version(self, rtype: str, rid: str, vid: str) -> Row | None:
        with self.lock:
            r = self._db.execute(
                "SELECT type, id, vid, ts, deleted, content FROM history WHERE type=? AND id=? AND vid=?",
                (rtype, rid, vid),
            ).fetchone()
        return _row(r) if r else None

    # ------------------------------------------------------------------ search
    def ids_by_identifier(self, rtype: str, tokens: Iterable[tuple[str | None, str | None]]) -> list[str]:
        """Ids of current resources matching any (system, value) token; None means "any" (FHIR token search)."""
        clauses: list[str] = []
        args: list[str] = [rtype]
        for system, value in tokens:
            parts = []
            if value is not None:
                parts.append("value=?")
                args.append(value)
            if system is not None:
                parts.append("system=?")
                args.append(system)
            clauses.append("(" + (" AND ".join(parts) or "1") + ")")
        if not clauses:
            return []
        sql = (
            "SELECT DISTINCT r.id FROM ident i JOIN resources r ON r.type=i.type AND r.id=i.id "
            f"WHERE i.type=? AND ({' OR '.join(clauses)}) AND r.deleted=0 ORDER BY r.rowid"
        )
        with self.lock:
            return [r[0] for r in self._db.execute(sql, args).fetchall()]

    def ids_of_type(self, rtype: str | None) -> list[str]:
        with self.lock:
            if rtype is None:
                rows = self._db.execute("SELECT id FROM resources WHERE deleted=0 ORDER BY rowid").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT id FROM resources WHERE type=? AND deleted=0 ORDER BY rowid", (rtype,)
                ).fetchall()
        return [r[0] for r in rows]

    def last_updated(self, rtype: str, ids: list[str]) -> dict[str, str]:
        """id -> meta.lastUpdated of the current versions (ISO instants sort as text)."""
        with self.lock:
            rows = self._db.execute("SELECT id, ts FROM resources WHERE type=?", (rtype,)).fetchall()
        wanted = set(ids)
        return {r[0]: r[1] for r in rows if r[0] in wanted}

    def read_many(self, rtype: str, ids: list[str]) -> list[Json]:
        out: list[Json] = []
        for rid in ids:
            row = self.read(rtype, rid)
            if row is not None and row.resource is not None and not row.deleted:
                out.append(row.resource)
        return out

    def resources(self, rtype: str) -> list[Json]:
        with self.lock:
            rows = self._db.execute(
                "SELECT content FROM resources WHERE type=? AND deleted=0 ORDER BY rowid", (rtype,)
            ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    def count(self, rtype: str | None = None) -> int:
        with self.lock:
            if rtype is None:
                r = self._db.execute("SELECT COUNT(*) FROM resources WHERE deleted=0").fetchone()
            else:
                r = self._db.execute(
                    "SELECT COUNT(*) FROM resources WHERE type=? AND deleted=0", (rtype,)
                ).fetchone()
        return int(r[0])

    # ------------------------------------------------------------------ binary bytes and settings
    def put_binary(self, rid: str, content_type: str, data: bytes) -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO binaries VALUES (?,?,?)", (rid, content_type, data))

    def get_binary(self, rid: str) -> tuple[str, bytes] | None:
        with self.lock:
            r = self._db.execute("SELECT content_type, data FROM binaries WHERE id=?", (rid,)).fetchone()
        return (str(r[0]), bytes(r[1])) if r else None

    def get_setting(self, key: str) -> str | None:
        with self.lock:
            r = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return str(r[0]) if r else None

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?,?)", (key, value))

    def wipe(self) -> None:
        """Delete all FHIR data (settings such as the token key survive)."""
        with self.transaction():
            for table in ("resources", "history", "ident", "binaries"):
                self._db.execute(f"DELETE FROM {table}")
