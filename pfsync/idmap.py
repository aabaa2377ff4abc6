"""The id map on disk: source identity -> Medplum id, version and content hash (SQLite, WAL).

`{state_dir}/{source}/idmap.sqlite` (preamble: state dir layout). It is a cache of what Medplum
holds, never the only truth: when it is missing (a stateless pod) the loader refills it from
batched identifier searches before writing (medplum.md "Ids and identity"), so losing it costs
searches, never duplicates. It also keeps, on disk so memory stays flat:

- rows with no Medplum id yet: every source id seen in the input, with its type, so a bare
  `urn:uuid:<id>` resolves by id alone (fixtures README: ids are unique across types);
- `deferred`: resources held back until their reference targets have Medplum ids;
- `logical`: resources written with logical references, to upgrade once the targets arrive;
- `binaries`: attachment SHA-1 -> Binary id, so unchanged content is not uploaded again.

Not thread-safe: the loader uses it from one thread only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pfsync.errors import StateError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS map (type TEXT NOT NULL, sid TEXT NOT NULL, mid TEXT, vid TEXT, hash TEXT,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS map_sid ON map (sid);
CREATE TABLE IF NOT EXISTS deferred (type TEXT NOT NULL, sid TEXT NOT NULL, file TEXT, line INTEGER,
    raw BLOB NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logical (type TEXT NOT NULL, sid TEXT NOT NULL, file TEXT, line INTEGER,
    raw BLOB NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS binaries (sha1 TEXT PRIMARY KEY, mid TEXT NOT NULL, size INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""
_CACHE_MAX = 200_000


@dataclass(frozen=True)
class MapRow:
    mid: str | None
    vid: str | None
    hash: str | None


@dataclass(frozen=True)
class Held:
    """A resource kept on disk (deferred or logical) with where it came from."""

    type: str
    sid: str
    file: str | None
    line: int | None
    raw: bytes


class IdMap:
    """Source (type, id) -> Medplum id. `cold` is True when the file was new or belonged to another
    Medplum server: then every identity is looked up in Medplum before anything is created."""

    def __init__(self, path: Path, *, target: str) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            existed = path.exists() and path.stat().st_size > 0
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the id map {path}: {exc}") from None
        self._cache: dict[tuple[str, str], MapRow] = {}
        self._in_tx = False
        known = self._kv("target")
        self.cold = not existed or known is None
        if known is not None and known != target:
            # Another Medplum server: its ids mean nothing here. Start over (the map is a cache).
            self._db.executescript("DELETE FROM map; DELETE FROM logical; DELETE FROM binaries;")
            self.cold = True
        self._db.execute("INSERT OR REPLACE INTO kv VALUES ('target', ?)", (target,))

    # -- transactions: one per batch result keeps SQLite fast and a crash loses at most a batch
    def begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()

    def _kv(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- the map
    def get(self, rtype: str, sid: str) -> MapRow | None:
        key = (rtype, sid)
        row = self._cache.get(key)
        if row is not None:
            return row
        found = self._db.execute("SELECT mid, vid, hash FROM map WHERE type = ? AND sid = ?", key).fetchone()
        if found is None:
            return None
        row = MapRow(*found)
        self._remember(key, row)
        return row

    def _remember(self, key: tuple[str, str], row: MapRow) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = row

    def types_of(self, sid: str) -> list[tuple[str, str | None]]:
        """Every (type, Medplum id or None) recorded for a source id: resolves `urn:uuid:<id>`."""
        return [(t, m) for t, m in self._db.execute("SELECT type, mid FROM map WHERE sid = ?", (sid,))]

    def seen(self, rtype: str, sid: str) -> None:
        """Note that the input holds this identity (not necessarily loaded yet)."""
        if (rtype, sid) in self._cache:
            return
        self.begin()
        self._db.execute("INSERT OR IGNORE INTO map (type, sid) VALUES (?, ?)", (rtype, sid))

    def record(self, rtype: str, sid: str, mid: str, vid: str | None, content_hash: str | None) -> None:
        self.begin()
        self._db.execute(
            "INSERT INTO map VALUES (?, ?, ?, ?, ?) ON CONFLICT (type, sid) DO UPDATE SET "
            "mid = excluded.mid, vid = excluded.vid, hash = excluded.hash",
            (rtype, sid, mid, vid, content_hash),
        )
        self._remember((rtype, sid), MapRow(mid, vid, content_hash))

    def forget(self, rtype: str, sid: str) -> None:
        """The resource is gone from Medplum (deleted, or a stale id): keep only that it exists."""
        self.begin()
        self._db.execute(
            "UPDATE map SET mid = NULL, vid = NULL, hash = NULL WHERE type = ? AND sid = ?", (rtype, sid)
        )
        self._cache.pop((rtype, sid), None)

    def counts(self) -> dict[str, int]:
        """Loaded identities per type."""
        rows = self._db.execute("SELECT type, count(*) FROM map WHERE mid IS NOT NULL GROUP BY type")
        return {t: n for t, n in rows}

    # -- held resources
    def hold(self, table: str, item: Held) -> None:
        assert table in ("deferred", "logical")
        self.begin()
        self._db.execute(
            f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?)",
            (item.type, item.sid, item.file, item.line, item.raw),
        )

    def release(self, table: str, rtype: str, sid: str) -> None:
        assert table in ("deferred", "logical")
        self.begin()
        self._db.execute(f"DELETE FROM {table} WHERE type = ? AND sid = ?", (rtype, sid))

    def held(self, table: str) -> Iterator[Held]:
        """A snapshot of a held table, read in pages so memory stays flat."""
        assert table in ("deferred", "logical")
        last: tuple[str, str] = ("", "")
        while True:
            page = self._db.execute(
                f"SELECT type, sid, file, line, raw FROM {table} WHERE (type, sid) > (?, ?) "
                "ORDER BY type, sid LIMIT 500",
                last,
            ).fetchall()
            if not page:
                return
            for t, s, f, line, raw in page:
                yield Held(t, s, f, line, bytes(raw))
            last = (page[-1][0], page[-1][1])

    def held_count(self, table: str) -> int:
        assert table in ("deferred", "logical")
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def is_held(self, table: str, rtype: str, sid: str) -> bool:
        assert table in ("deferred", "logical")
        q = f"SELECT 1 FROM {table} WHERE type = ? AND sid = ?"
        return self._db.execute(q, (rtype, sid)).fetchone() is not None

    # -- binaries
    def binary(self, sha1: str) -> str | None:
        row = self._db.execute("SELECT mid FROM binaries WHERE sha1 = ?", (sha1,)).fetchone()
        return None if row is None else str(row[0])

    def record_binary(self, sha1: str, mid: str, size: int) -> None:
        self.begin()
        self._db.execute("INSERT OR REPLACE INTO binaries VALUES (?, ?, ?)", (sha1, mid, size))
