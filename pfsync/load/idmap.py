"""The id map on disk: source identity -> Medplum id, version and content hash (SQLite, WAL).

`{state_dir}/{source}/idmap.sqlite` (preamble: state dir layout). It is a cache of what Medplum
holds, never the only truth: when it is missing (a stateless pod) the loader refills it from
batched identifier searches before writing (docs/medplum.md "Ids and identity"), so losing it costs
searches, never duplicates. It also keeps, on disk so memory stays flat:

- rows with no Medplum id yet: every source id seen in the input, with its type, so a bare
  `urn:uuid:<id>` resolves by id alone (fixtures README: ids are unique across types). While the
  whole map fits in the memory cache they stay there (this run's scan notes them again next run);
  past the cache's budget they go to disk with the rest;
- `binaries`: attachment SHA-1 -> Binary id, so unchanged content is not uploaded again;
- `loaded`: keys of input files whose every resource is written or held here (`mark_loaded`);
- `fetched`: identities fetched from the source by reference (`fetched_identities`).

The same file holds the resources waiting on disk for their reference targets (pfsync.load.holds,
`IdMap.holds`): this module owns the connection and its transaction, and tells the holds which
identities got a Medplum id as it writes them.

Speed and memory: the map is read into memory when it fits in `cache_bytes` (load.idmap_cache_bytes,
an estimate of what the cached rows cost in CPython: about 650 bytes per loaded identity), so a
lookup is a dict access and a miss is definitive. Past the budget the cache keeps the most recently
added half of its rows and a miss asks SQLite (one indexed read): memory stays flat whatever the size
of the practice (the whole map in memory was most of a large first sync's peak). Every change (the
holds' too) is buffered and written with `executemany` every `_FLUSH_ROWS` rows, in one transaction
committed at `commit` (the end of a file), never one statement per resource; every buffered row is
also in the cache (the cache writes the buffers before it drops rows), so a miss needs no flush.
A crash loses at most the uncommitted buffer, which is safe: the map is a cache (see above).

Not thread-safe: the loader uses it from one thread only.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pfsync.core.errors import StateError
from pfsync.core.private import private_dir, private_sqlite
from pfsync.core.settings import LoadSettings
from pfsync.load.holds import Holds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS map (type TEXT NOT NULL, sid TEXT NOT NULL, mid TEXT, vid TEXT, hash TEXT,
    PRIMARY KEY (type, sid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS map_sid ON map (sid);
CREATE TABLE IF NOT EXISTS binaries (sha1 TEXT PRIMARY KEY, mid TEXT NOT NULL, size INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS loaded (key TEXT PRIMARY KEY) WITHOUT ROWID;
-- Identities fetched from the source by reference (the export left them out): `pfsync verify`
-- counts them as the source's, not as extras.
CREATE TABLE IF NOT EXISTS fetched (type TEXT NOT NULL, sid TEXT NOT NULL, PRIMARY KEY (type, sid)) WITHOUT ROWID;
"""
# The settings' defaults, not a second copy of them (a map opened without settings: verify --fix, tests).
DEFAULT_CACHE_BYTES = LoadSettings().idmap_cache_bytes
DEFAULT_SQLITE_CACHE_BYTES = LoadSettings().idmap_sqlite_cache_bytes
# Estimated bytes of one cached row beyond its strings' characters (CPython 3.11, 64-bit): the key
# tuple, the MapRow, the dict slots and the sid index list (~330, measured with tracemalloc on
# 100k rows), plus a str header (~50) for each of the row's strings.
_ROW_FIXED = 330
_STR_HEADER = 50
_FLUSH_ROWS = 1000  # buffered rows written (not committed) at once, so no flush stalls the loader


@dataclass(frozen=True)
class MapRow:
    mid: str | None
    vid: str | None
    hash: str | None


_SEEN = MapRow(None, None, None)


def _cost(key: tuple[str, str], row: MapRow) -> int:
    """Estimated bytes of one cached row (the type string is shared by every row of the type)."""
    size = _ROW_FIXED + _STR_HEADER + len(key[1])
    for text in (row.mid, row.vid, row.hash):
        if text is not None:
            size += _STR_HEADER + len(text)
    return size


def _bound_memory(db: sqlite3.Connection, cache_bytes: int) -> None:
    """What SQLite may keep in this process's memory for the file, whatever the build's defaults:
    a page cache of `cache_bytes` in all (three quarters for the file, a quarter for the TEMP
    tables of pfsync.load.holds), TEMP tables in a temporary file rather than in memory (they grow
    with the changes between two settle points), and no memory-mapped reads (mapped pages of a
    large map would count in the resident set)."""
    kib = max(cache_bytes // 1024, 64)
    db.execute("PRAGMA temp_store=FILE")  # before the first TEMP table: it decides where they live
    db.execute("PRAGMA mmap_size=0")
    db.execute(f"PRAGMA main.cache_size=-{kib - kib // 4}")
    db.execute(f"PRAGMA temp.cache_size=-{kib // 4}")


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

    def __init__(
        self, path: Path, *, target: str, cache_bytes: int = DEFAULT_CACHE_BYTES,
        sqlite_cache_bytes: int = DEFAULT_SQLITE_CACHE_BYTES,
    ) -> None:  # fmt: skip
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
            _bound_memory(self._db, sqlite_cache_bytes)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the id map {path}: {exc}") from None
        self._cache: dict[tuple[str, str], MapRow] = {}
        self._by_sid: dict[str, list[str]] = {}  # sid -> types, only while the cache is complete
        self._complete = False
        self._in_tx = False
        self._seen: list[tuple[str, str]] = []
        self._rows: dict[tuple[str, str], MapRow] = {}
        # sid -> types of the buffered rows while the cache is incomplete: `types_of` answers from
        # SQLite plus these, without a flush per bare `urn:uuid` reference (tiny batches).
        self._buffered: dict[str, list[str]] = {}
        try:
            self.holds = Holds(self._db, flush=self._flush, begin=self.begin)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the id map {path}: {exc}") from None
        known = self._kv("target")
        self.cold = not existed or known is None
        if known is not None and known != target:
            # Another Medplum server: its ids mean nothing here. Start over (the map is a cache).
            self._db.executescript("DELETE FROM map; DELETE FROM binaries; DELETE FROM loaded;")
            self.holds.drop_logical()
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
        """Write the buffered changes (the map's, then the holds') in the open transaction."""
        self._flush_map()
        self.holds.write_buffer()

    def _flush_map(self) -> None:
        if (self._seen and not self._complete) or self._rows:
            self.begin()
            if self._seen and not self._complete:
                self._db.executemany("INSERT OR IGNORE INTO map (type, sid) VALUES (?, ?)", self._seen)
                self._seen = []
            if self._rows:
                self._db.executemany(
                    "INSERT INTO map VALUES (?, ?, ?, ?, ?) ON CONFLICT (type, sid) DO UPDATE SET "
                    "mid = excluded.mid, vid = excluded.vid, hash = excluded.hash",
                    [(t, s, r.mid, r.vid, r.hash) for (t, s), r in self._rows.items()],
                )
                self.holds.arrived([k for k, r in self._rows.items() if r.mid is not None])
                self._rows = {}
            if not self._complete:
                self._buffered = {}

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
        found: dict[str, str | None] = dict(
            self._db.execute("SELECT type, mid FROM map WHERE sid = ?", (sid,))
        )
        for t in self._buffered.get(sid, ()):
            row = self._cache.get((t, sid))  # every buffered row is in the cache (_evict writes them first)
            if row is not None:
                found[t] = row.mid
        return sorted(found.items())

    def seen(self, rtype: str, sid: str) -> None:
        """Note that the input holds this identity (not necessarily loaded yet)."""
        key = (rtype, sid)
        if key in self._cache or (not self._complete and self.get(rtype, sid) is not None):
            return
        self._seen.append(key)
        self._remember(key, _SEEN)
        self._note_buffered(key)
        if len(self._seen) >= _FLUSH_ROWS and not self._complete:
            self._flush_map()

    def _note_buffered(self, key: tuple[str, str]) -> None:
        if not self._complete:
            types = self._buffered.setdefault(key[1], [])
            if key[0] not in types:
                types.append(key[0])

    def record(self, rtype: str, sid: str, mid: str, vid: str | None, content_hash: str | None) -> None:
        row = MapRow(mid, vid, content_hash)
        self._rows[(rtype, sid)] = row
        self._remember((rtype, sid), row)
        self._note_buffered((rtype, sid))
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
        self._note_buffered((rtype, sid))

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
