"""The id map on disk: source identity -> Medplum id, version and content hash (SQLite, WAL).

`{state_dir}/{source}/idmap.sqlite` (preamble: state dir layout). It is a cache of what Medplum
holds, never the only truth: when it is missing (a stateless pod) the loader refills it from
batched identifier searches before writing (docs/medplum.md "Ids and identity"), so losing it costs
searches, never duplicates. It also keeps, on disk so memory stays flat:

- rows with no Medplum id yet: every source id seen in the input, with its type, so a bare
  `urn:uuid:<id>` resolves by id alone (fixtures README: ids are unique across types). While the
  whole map fits in the memory cache they stay there (this run's scan notes them again next run;
  writing 11k of them cost the load's start 25-35 ms with the server idle); past the cache's
  budget they go to disk with the rest;
- `deferred`: resources held back until their reference targets have Medplum ids, and `waits`:
  which targets each of them still waits for (so the ones whose targets have arrived are found
  with one query instead of re-reading every held resource);
- `logical`: resources written with logical references, to upgrade once the targets arrive;
- `binaries`: attachment SHA-1 -> Binary id, so unchanged content is not uploaded again;
- `loaded`: keys of input files whose every resource is written or held here (`mark_loaded`).

Speed and memory: the map is read into memory when it fits in `cache_bytes` (load.idmap_cache_bytes,
an estimate of what the cached rows cost in CPython: about 650 bytes per loaded identity), so a
lookup is a dict access and a miss is definitive. Past the budget the cache keeps the most recently
added half of its rows and a miss asks SQLite (one indexed read): memory stays flat whatever the size
of the practice (the whole map in memory was most of a large first sync's peak). Every change is
buffered and written with `executemany` every `_FLUSH_ROWS` rows, in one transaction committed at
`commit` (the end of a file), never one statement per resource; every buffered row is also in the
cache (the cache writes the buffers before it drops rows), so a miss needs no flush.
A crash loses at most the uncommitted buffer, which is safe: the map is a cache (see above).

Not thread-safe: the loader uses it from one thread only.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pfsync.core.errors import StateError
from pfsync.core.private import private_dir, private_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS map (type TEXT NOT NULL, sid TEXT NOT NULL, mid TEXT, vid TEXT, hash TEXT,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS map_sid ON map (sid);
CREATE TABLE IF NOT EXISTS deferred (type TEXT NOT NULL, sid TEXT NOT NULL, file TEXT, line INTEGER,
    raw BLOB NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
-- writable() joins waits to deferred by source id alone: without this index that join scanned
-- every held row per wait row, quadratic at finish() of a 100k first sync.
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
CREATE TABLE IF NOT EXISTS binaries (sha1 TEXT PRIMARY KEY, mid TEXT NOT NULL, size INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS loaded (key TEXT PRIMARY KEY) WITHOUT ROWID;
-- Identities fetched from the source by reference (the export left them out): `pfsync verify`
-- counts them as the source's, not as extras.
CREATE TABLE IF NOT EXISTS fetched (type TEXT NOT NULL, sid TEXT NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
"""
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024  # load.idmap_cache_bytes
# Estimated bytes of one cached row beyond its strings' characters (CPython 3.11, 64-bit): the key
# tuple, the MapRow, the dict slots and the sid index list (~330, measured with tracemalloc on
# 100k rows), plus a str header (~50) for each of the row's strings.
_ROW_FIXED = 330
_STR_HEADER = 50
_FLUSH_ROWS = 1000  # buffered rows written (not committed) at once, so no flush stalls the loader
_TABLES = ("deferred", "logical")
_WAITS = {"deferred": "waits", "logical": "logical_waits"}  # the targets each held row waits for
# A waited-for target whose type is unknown (a `urn:uuid:<id>` no input has named yet).
ANY_TYPE = ""


@dataclass(frozen=True)
class MapRow:
    mid: str | None
    vid: str | None
    hash: str | None


_SEEN = MapRow(None, None, None)


@dataclass(frozen=True)
class Held:
    """A resource kept on disk (deferred or logical) with where it came from."""

    type: str
    sid: str
    file: str | None
    line: int | None
    raw: bytes


def _cost(key: tuple[str, str], row: MapRow) -> int:
    """Estimated bytes of one cached row (the type string is shared by every row of the type)."""
    size = _ROW_FIXED + _STR_HEADER + len(key[1])
    for text in (row.mid, row.vid, row.hash):
        if text is not None:
            size += _STR_HEADER + len(text)
    return size


def fetched_identities(path: Path) -> Iterator[tuple[str, str]]:
    """(type, sid) of every identity the loader fetched by reference, read-only (none without a map)."""
    if not path.is_file():
        return
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open the id map {path}: {exc}") from None
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fetched'").fetchone() is None:
            return  # a map from before the table
        yield from db.execute("SELECT type, sid FROM fetched ORDER BY type, sid")
    except sqlite3.Error as exc:
        raise StateError(f"cannot read the id map {path}: {exc}") from None
    finally:
        db.close()


class IdMap:
    """Source (type, id) -> Medplum id. `cold` is True when the file was new or belonged to another
    Medplum server: then every identity is looked up in Medplum before anything is created."""

    def __init__(self, path: Path, *, target: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = path
        self._budget = cache_bytes
        self._cache_bytes = 0  # estimated (see _cost)
        try:
            private_dir(path.parent)
            existed = path.exists() and path.stat().st_size > 0
            private_sqlite(path)  # it holds raw resources waiting for their targets: 0600, no links
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the id map {path}: {exc}") from None
        self._cache: dict[tuple[str, str], MapRow] = {}
        self._by_sid: dict[str, list[str]] = {}  # sid -> types, only while the cache is complete
        self._complete = False
        self._in_tx = False
        self._seen: list[tuple[str, str]] = []
        self._rows: dict[tuple[str, str], MapRow] = {}
        self._held: dict[tuple[str, str, str], tuple[Held | None, tuple[tuple[str, str], ...]]] = {}
        known = self._kv("target")
        self.cold = not existed or known is None
        if known is not None and known != target:
            # Another Medplum server: its ids mean nothing here. Start over (the map is a cache).
            self._db.executescript(
                "DELETE FROM map; DELETE FROM logical; DELETE FROM binaries; DELETE FROM loaded;"
            )
            self.cold = True
        self._db.execute("INSERT OR REPLACE INTO kv VALUES ('target', ?)", (target,))
        self._load_cache()

    def _load_cache(self) -> None:
        """Read the map into the cache while it fits the budget (what fits stays, warm, if not all)."""
        self._complete = True
        for t, s, mid, vid, h in self._db.execute("SELECT type, sid, mid, vid, hash FROM map"):
            key, row = (t, s), MapRow(mid, vid, h) if mid is not None else _SEEN
            cost = _cost(key, row)
            if self._cache_bytes + cost > self._budget:
                self._complete = False
                self._by_sid.clear()
                return
            self._cache[key] = row
            self._cache_bytes += cost
            self._by_sid.setdefault(s, []).append(t)

    # -- transactions: buffered changes go to disk in one transaction per commit
    def begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        """Write every buffered change and commit (durable against a crash of this process)."""
        self._flush()
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    def _flush(self) -> None:
        if not ((self._seen and not self._complete) or self._rows or self._held):
            return
        self.begin()
        db = self._db
        if self._seen and not self._complete:
            db.executemany("INSERT OR IGNORE INTO map (type, sid) VALUES (?, ?)", self._seen)
            self._seen = []
        if self._rows:
            db.executemany(
                "INSERT INTO map VALUES (?, ?, ?, ?, ?) ON CONFLICT (type, sid) DO UPDATE SET "
                "mid = excluded.mid, vid = excluded.vid, hash = excluded.hash",
                [(t, s, r.mid, r.vid, r.hash) for (t, s), r in self._rows.items()],
            )
            self._rows = {}
        if self._held:
            for table in _TABLES:
                keys = [(t, s) for (tb, t, s) in self._held if tb == table]
                if not keys:
                    continue
                db.executemany(f"DELETE FROM {table} WHERE type = ? AND sid = ?", keys)
                db.executemany(f"DELETE FROM {_WAITS[table]} WHERE type = ? AND sid = ?", keys)
                items = [(item, waits) for (tb, _, _), (item, waits) in self._held.items()
                         if tb == table and item is not None]  # fmt: skip
                db.executemany(
                    f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?)",
                    [(i.type, i.sid, i.file, i.line, i.raw) for i, _ in items],
                )
                db.executemany(
                    f"INSERT OR IGNORE INTO {_WAITS[table]} VALUES (?, ?, ?, ?)",
                    [(i.type, i.sid, tt, ts) for i, waits in items for tt, ts in waits],
                )
            self._held = {}

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
        if row is not None or self._complete:
            return row
        # No flush: every buffered row is in the cache (_evict writes the buffers first).
        found = self._db.execute("SELECT mid, vid, hash FROM map WHERE type = ? AND sid = ?", key).fetchone()
        if found is None:
            return None
        row = MapRow(*found)
        self._remember(key, row)
        return row

    def _remember(self, key: tuple[str, str], row: MapRow) -> None:
        old = self._cache.pop(key, None)  # re-inserted last: the eviction keeps the newer half
        if old is None:
            self._cache_bytes += _cost(key, row)
            if self._complete:
                self._by_sid.setdefault(key[1], []).append(key[0])
        else:
            self._cache_bytes += _cost(key, row) - _cost(key, old)
        self._cache[key] = row
        if self._cache_bytes > self._budget:
            self._evict()

    def _evict(self) -> None:
        """Over budget: keep the half of the rows added or changed last; every row stays on disk.

        Dropping the whole cache (as before) made every lookup after it a SQLite read until it
        refilled; keeping half costs one pass over the rows per half a budget of new rows."""
        self._complete = False
        self._flush()  # the buffered rows (and the noted identities) are only in the cache so far
        self._by_sid.clear()
        drop = len(self._cache) - len(self._cache) // 2
        self._cache = dict(itertools.islice(self._cache.items(), drop, None))
        self._cache_bytes = sum(_cost(k, r) for k, r in self._cache.items())

    @property
    def cache_bytes(self) -> int:
        """Estimated bytes the cached rows take now (at most the budget, give or take one row)."""
        return self._cache_bytes

    def types_of(self, sid: str) -> list[tuple[str, str | None]]:
        """Every (type, Medplum id or None) recorded for a source id: resolves `urn:uuid:<id>`."""
        if self._complete:
            return [(t, self._cache[(t, sid)].mid) for t in self._by_sid.get(sid, ())]
        self._flush()
        return [(t, m) for t, m in self._db.execute("SELECT type, mid FROM map WHERE sid = ?", (sid,))]

    def seen(self, rtype: str, sid: str) -> None:
        """Note that the input holds this identity (not necessarily loaded yet)."""
        key = (rtype, sid)
        if key in self._cache or (not self._complete and self.get(rtype, sid) is not None):
            return
        self._seen.append(key)
        self._remember(key, _SEEN)

    def record(self, rtype: str, sid: str, mid: str, vid: str | None, content_hash: str | None) -> None:
        row = MapRow(mid, vid, content_hash)
        self._rows[(rtype, sid)] = row
        self._remember((rtype, sid), row)
        if len(self._rows) >= _FLUSH_ROWS:
            # In the open transaction, committed at the next settle point. One flush of a whole
            # file's rows at its end held the loader's thread for 50-100 ms while Bundles in flight
            # came back and no new ones went out (the server sat idle).
            self._flush()

    def note_fetched(self, rtype: str, sid: str) -> None:
        """This identity was fetched from the source by reference (committed with the next commit)."""
        self.begin()
        self._db.execute("INSERT OR IGNORE INTO fetched VALUES (?, ?)", (rtype, sid))

    def forget(self, rtype: str, sid: str) -> None:
        """The resource is gone from Medplum (deleted, or a stale id): keep only that it exists."""
        self._rows[(rtype, sid)] = _SEEN
        self._remember((rtype, sid), _SEEN)

    def loaded_ids(self, rtype: str, after: str = "", limit: int = 500) -> list[str]:
        """Source ids of this type that have a Medplum id, in order, the first `limit` after `after`
        (paged by the caller, so memory stays flat)."""
        self._flush()
        rows = self._db.execute(
            "SELECT sid FROM map WHERE type = ? AND sid > ? AND mid IS NOT NULL ORDER BY sid LIMIT ?",
            (rtype, after, limit),
        )
        return [str(r[0]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Loaded identities per type."""
        self._flush()
        rows = self._db.execute("SELECT type, count(*) FROM map WHERE mid IS NOT NULL GROUP BY type")
        return {t: n for t, n in rows}

    # -- held resources
    def hold(self, table: str, item: Held, waits: Iterable[tuple[str, str]] = ()) -> None:
        """Keep a resource on disk; `waits`: the (type, sid) targets it waits for (deferred: type
        ANY_TYPE when only the id is known; logical: the targets named logically)."""
        assert table in _TABLES
        self._held[(table, item.type, item.sid)] = (item, tuple(waits))

    def release(self, table: str, rtype: str, sid: str) -> None:
        assert table in _TABLES
        self._held[(table, rtype, sid)] = (None, ())

    def held(self, table: str) -> Iterator[Held]:
        """A snapshot of a held table, read in pages so memory stays flat."""
        assert table in _TABLES
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
        """The rows of `query` (type, sid, file, line, raw, bounded by `(type, sid) > (?, ?)`), 500
        at a time, each page asked after the previous one is used (rows may change meanwhile)."""
        self._flush()
        last: tuple[str, str] = ("", "")
        while True:
            page = self._db.execute(query + " ORDER BY type, sid LIMIT 500", last).fetchall()
            if not page:
                return
            for t, s, f, line, raw in page:
                yield Held(t, s, f, line, bytes(raw))
            last = (page[-1][0], page[-1][1])

    def held_count(self, table: str) -> int:
        assert table in _TABLES
        self._flush()
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def is_held(self, table: str, rtype: str, sid: str) -> bool:
        assert table in _TABLES
        self._flush()
        q = f"SELECT 1 FROM {table} WHERE type = ? AND sid = ?"
        return self._db.execute(q, (rtype, sid)).fetchone() is not None

    def ready(self, limit: int = 1000) -> list[Held]:
        """Deferred resources whose every waited-for target now has a Medplum id (waits of targets
        that arrived are dropped first)."""
        self._flush()
        self.begin()
        self._db.execute(
            "DELETE FROM waits WHERE EXISTS (SELECT 1 FROM map m WHERE m.mid IS NOT NULL AND m.sid = waits.tsid "
            "AND (waits.ttype = '' OR m.type = waits.ttype))"
        )
        return self._select_held(
            "NOT EXISTS (SELECT 1 FROM waits w WHERE w.type = d.type AND w.sid = d.sid)", limit
        )

    def writable(self, limit: int = 1000) -> list[Held]:
        """Deferred resources that wait for no other deferred resource (only for targets that will
        not arrive in this run): written now, with logical references to those targets."""
        self._flush()
        return self._select_held(
            "NOT EXISTS (SELECT 1 FROM waits w JOIN deferred d2 ON d2.sid = w.tsid "
            "AND (w.ttype = '' OR d2.type = w.ttype) WHERE w.type = d.type AND w.sid = d.sid)",
            limit,
        )

    def _select_held(self, where: str, limit: int) -> list[Held]:
        rows = self._db.execute(
            f"SELECT type, sid, file, line, raw FROM deferred d WHERE {where} ORDER BY type, sid LIMIT ?",
            (limit,),
        )
        return [Held(t, s, f, line, bytes(raw)) for t, s, f, line, raw in rows]

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

    # -- input files whose resources are all written or held here (pfsync.load.loader.Loader.mark_loaded)
    def mark_loaded(self, key: str) -> None:
        self._flush()
        self.begin()
        self._db.execute("INSERT OR IGNORE INTO loaded VALUES (?)", (key,))

    def is_loaded(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM loaded WHERE key = ?", (key,)).fetchone() is not None

    # -- binaries
    def binary(self, sha1: str) -> str | None:
        row = self._db.execute("SELECT mid FROM binaries WHERE sha1 = ?", (sha1,)).fetchone()
        return None if row is None else str(row[0])

    def record_binary(self, sha1: str, mid: str, size: int) -> None:
        self.begin()
        self._db.execute("INSERT OR REPLACE INTO binaries VALUES (?, ?, ?)", (sha1, mid, size))
