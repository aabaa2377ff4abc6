"""SQLite resource store of the source sandbox: one row per resource, so 1M-resource datasets stay out of RAM.

Every row carries the practice, type, id, the patient whose compartment holds it, a last-updated stamp
and a deletion stamp. Stamps come from `Clock`, which never hands out the same millisecond twice: an
export's `transactionTime` is itself a tick, so a later `_since=transactionTime` export sees exactly the
changes made after the snapshot (docs/bulk-data.md: "Incremental sync").
"""

from __future__ import annotations

import gzip
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# The fixtures' DocumentReferences point at the origin the data was exported from (fixtures/README.md).
FIXTURE_ORIGIN = "http://127.0.0.1:9443"
# Reference fields that put a resource in a patient's compartment (FHIR R4 compartment definitions,
# reduced to the fields these datasets use).
PATIENT_FIELDS = ("subject", "patient", "beneficiary")
_BATCH = 5_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    practice TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, patient TEXT,
    last_updated INTEGER NOT NULL, deleted_at INTEGER, added INTEGER NOT NULL DEFAULT 0,
    json BLOB NOT NULL, PRIMARY KEY (practice, type, id));
CREATE INDEX IF NOT EXISTS res_patient ON resources (practice, type, patient);
CREATE TABLE IF NOT EXISTS baseline AS SELECT * FROM resources WHERE 0;
CREATE UNIQUE INDEX IF NOT EXISTS baseline_key ON baseline (practice, type, id);
CREATE TABLE IF NOT EXISTS members (
    practice TEXT NOT NULL, group_id TEXT NOT NULL, patient TEXT NOT NULL, added INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (practice, group_id, patient));
CREATE TABLE IF NOT EXISTS groups (
    practice TEXT NOT NULL, group_id TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (practice, group_id));
CREATE TABLE IF NOT EXISTS attachments (
    practice TEXT NOT NULL, key TEXT NOT NULL, content_type TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (practice, key));
"""


class Clock:
    """Strictly increasing millisecond stamps (thread-safe)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            self._last = max(int(time.time() * 1000), self._last + 1)
            return self._last


def ms_to_instant(ms: int) -> str:
    """FHIR instant with milliseconds, UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def instant_to_ms(text: str) -> int:
    """Parse a FHIR instant or date (date-only `_since` is accepted, docs/bulk-data.md, recorded case 27). Raises ValueError."""
    value = text.strip()
    if len(value) == 10:
        value += "T00:00:00Z"
    if "T" not in value:
        raise ValueError(text)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{text}: an instant needs a time zone")
    return int(parsed.timestamp() * 1000)


def patient_of(resource: dict[str, Any]) -> str | None:
    """The patient whose compartment holds `resource` (Patient itself included), from `Type/id` or `urn:uuid:`."""
    if resource.get("resourceType") == "Patient":
        return str(resource["id"])
    for name in PATIENT_FIELDS:
        ref = resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            text: str = ref["reference"]
            if text.startswith("Patient/"):
                return text[8:]
            if text.startswith("urn:uuid:"):  # Synthea leftovers (fixtures/README.md)
                return text[9:]
    return None


@dataclass(frozen=True)
class Row:
    type: str
    id: str
    json: bytes


class Store:
    """All practices' resources in one SQLite file; a connection per thread, writes serialised."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self._local = threading.local()
        self._write = threading.RLock()
        with self._write:
            self.db.executescript(_SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # a sandbox: losing it on a crash is fine
            self._local.conn = conn
        return conn

    # ---- loading -------------------------------------------------------------------------------
    def load_dir(self, practice: str, data_dir: Path, base_url: str) -> dict[str, int]:
        """Load every `*.ndjson` / `*.ndjson.gz` file of `data_dir`; returns counts per type."""
        counts: dict[str, int] = {}
        files = sorted([*data_dir.glob("*.ndjson"), *data_dir.glob("*.ndjson.gz")])
        for file in files:
            opener = gzip.open if file.name.endswith(".gz") else open
            with opener(file, "rb") as fh:
                for rtype, n in self.load_lines(practice, fh, base_url).items():
                    counts[rtype] = counts.get(rtype, 0) + n
        return counts

    def load_lines(self, practice: str, lines: Iterable[bytes], base_url: str) -> dict[str, int]:
        """Insert NDJSON lines as baseline rows (streamed in batches: flat memory)."""
        stamp = self.clock.tick()  # "Resources without meta.lastUpdated get a load time"
        counts: dict[str, int] = {}
        batch: list[tuple[Any, ...]] = []
        for line in lines:
            if not line.strip():
                continue
            res = orjson.loads(line)
            rtype = res["resourceType"]
            counts[rtype] = counts.get(rtype, 0) + 1
            batch.append(self._row(practice, res, stamp, base_url))
            if rtype == "Group":
                self._load_group(practice, res)
            if len(batch) >= _BATCH:
                self._insert(batch)
                batch = []
        self._insert(batch)
        return counts

    def _row(self, practice: str, res: dict[str, Any], stamp: int, base_url: str) -> tuple[Any, ...]:
        meta = res.setdefault("meta", {})
        last = meta.get("lastUpdated")
        ms = stamp
        if isinstance(last, str):
            try:
                ms = instant_to_ms(last)
            except ValueError:
                meta["lastUpdated"] = ms_to_instant(stamp)
        else:
            meta["lastUpdated"] = ms_to_instant(stamp)
        if res["resourceType"] == "DocumentReference":
            self._rewrite_attachments(practice, res, base_url)
        return (
            practice,
            res["resourceType"],
            str(res["id"]),
            patient_of(res),
            ms,
            None,
            0,
            orjson.dumps(res),
        )

    def _insert(self, batch: list[tuple[Any, ...]]) -> None:
        if not batch:
            return
        with self._write:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO resources VALUES (?,?,?,?,?,?,?,?)", batch)
            self.db.execute("COMMIT")

    def _load_group(self, practice: str, res: dict[str, Any]) -> None:
        patients = []
        for member in res.get("member", []):
            ref = str(member.get("entity", {}).get("reference", ""))
            patients.append(ref.rsplit("/", 1)[-1].removeprefix("urn:uuid:"))
        self.create_group(practice, str(res["id"]), str(res.get("name", res["id"])), patients)

    def _rewrite_attachments(self, practice: str, res: dict[str, Any], base_url: str) -> None:
        """Point attachment URLs of the fixtures' dead origin at this sandbox, and remember what to serve."""
        for content in res.get("content", []):
            att = content.get("attachment", {})
            url = att.get("url")
            if not isinstance(url, str) or not url.startswith(FIXTURE_ORIGIN + "/"):
                continue
            path = url[len(FIXTURE_ORIGIN) + 1 :]
            if "/attachments/" in path:  # reference-server layout: {sim}/fhir/attachments/{name}
                path = "attachments/" + path.rsplit("/attachments/", 1)[1]
            att["url"] = f"{base_url}/{path}"
            ctype = str(att.get("contentType", "application/octet-stream"))
            with self._write:
                self.db.execute(
                    "INSERT OR REPLACE INTO attachments VALUES (?,?,?,?)",
                    (practice, path, ctype, int(att.get("size", 1024))),
                )

    def attachment(self, practice: str, key: str) -> tuple[str, int] | None:
        row = self.db.execute(
            "SELECT content_type, size FROM attachments WHERE practice=? AND key=?", (practice, key)
        ).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    # ---- groups --------------------------------------------------------------------------------
    def create_group(self, practice: str, group_id: str, name: str, patients: Iterable[str]) -> None:
        with self._write:
            self.db.execute("INSERT OR IGNORE INTO groups VALUES (?,?,?)", (practice, group_id, name))
            self.db.executemany(
                "INSERT OR IGNORE INTO members VALUES (?,?,?,0)", [(practice, group_id, p) for p in patients]
            )

    def add_members(self, practice: str, group_id: str, patients: Iterable[str]) -> None:
        with self._write:
            self.db.executemany(
                "INSERT OR IGNORE INTO members VALUES (?,?,?,1)", [(practice, group_id, p) for p in patients]
            )

    def groups(self, practice: str) -> list[tuple[str, str, int]]:
        """(id, name, member count) of each group of the practice."""
        rows = self.db.execute(
            "SELECT g.group_id, g.name, (SELECT count(*) FROM members m WHERE m.practice=g.practice"
            " AND m.group_id=g.group_id) FROM groups g WHERE g.practice=? ORDER BY g.group_id",
            (practice,),
        ).fetchall()
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    def group_resources(self, practice: str) -> Iterator[bytes]:
        """The practice's groups that the data did not bring as resources (the default ones), as
        Group resources with their members: what a system-level export of Group holds."""
        for gid, name, _ in self.groups(practice):
            if self.get(practice, "Group", gid) is not None:
                continue
            rows = self.db.execute("SELECT patient FROM members WHERE practice=? AND group_id=? ORDER BY patient",
                                   (practice, gid)).fetchall()  # fmt: skip
            yield orjson.dumps({"resourceType": "Group", "id": gid, "type": "person", "actual": True, "name": name,
                                "quantity": len(rows),
                                "member": [{"entity": {"reference": f"Patient/{r[0]}"}} for r in rows]})  # fmt: skip

    def has_group(self, practice: str, group_id: str) -> bool:
        sql = "SELECT 1 FROM groups WHERE practice=? AND group_id=?"
        return self.db.execute(sql, (practice, group_id)).fetchone() is not None

    def patient_ids(self, practice: str, limit: int | None = None) -> list[str]:
        sql = (
            "SELECT id FROM resources WHERE practice=? AND type='Patient' AND deleted_at IS NULL ORDER BY id"
        )
        rows = self.db.execute(sql + (f" LIMIT {int(limit)}" if limit else ""), (practice,)).fetchall()
        return [str(r[0]) for r in rows]

    # ---- mutations -----------------------------------------------------------------------------
    def _keep_baseline(self, practice: str, rtype: str, rid: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO baseline SELECT * FROM resources WHERE practice=? AND type=? AND id=?"
            " AND added=0",
            (practice, rtype, rid),
        )

    def upsert(self, practice: str, resource: dict[str, Any], base_url: str) -> dict[str, Any]:
        """Create or replace a resource, stamping a new meta.lastUpdated; returns the stored resource."""
        res = orjson.loads(orjson.dumps(resource))
        stamp = self.clock.tick()
        res.setdefault("meta", {})["lastUpdated"] = ms_to_instant(stamp)
        row = self._row(practice, res, stamp, base_url)
        with self._write:
            self.db.execute("BEGIN")
            self._keep_baseline(practice, row[1], row[2])
            existed = self.db.execute(
                "SELECT added FROM resources WHERE practice=? AND type=? AND id=?", row[:3]
            ).fetchone()
            added = 1 if existed is None or existed[0] == 1 else 0
            self.db.execute(
                "INSERT OR REPLACE INTO resources VALUES (?,?,?,?,?,?,?,?)", (*row[:6], added, row[7])
            )
            self.db.execute("COMMIT")
        return dict(res)

    def delete(self, practice: str, rtype: str, rid: str) -> bool:
        """Mark a resource deleted (its deletion time feeds the manifest's `deleted[]`)."""
        with self._write:
            self.db.execute("BEGIN")
            self._keep_baseline(practice, rtype, rid)
            cur = self.db.execute(
                "UPDATE resources SET deleted_at=? WHERE practice=? AND type=? AND id=? AND deleted_at IS NULL",
                (self.clock.tick(), practice, rtype, rid),
            )
            self.db.execute("COMMIT")
            return cur.rowcount > 0

    def reset(self) -> None:
        """Undo every mutation since loading: restore changed rows, drop added rows and members."""
        with self._write:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM resources WHERE added=1")
            self.db.execute("INSERT OR REPLACE INTO resources SELECT * FROM baseline")
            self.db.execute("DELETE FROM baseline")
            self.db.execute("DELETE FROM members WHERE added=1")
            self.db.execute("COMMIT")

    # ---- reads ---------------------------------------------------------------------------------
    def get(self, practice: str, rtype: str, rid: str) -> bytes | None:
        row = self.db.execute(
            "SELECT json FROM resources WHERE practice=? AND type=? AND id=? AND deleted_at IS NULL",
            (practice, rtype, rid),
        ).fetchone()
        return bytes(row[0]) if row else None

    def search(self, practice: str, rtype: str, ids: list[str] | None, limit: int) -> list[bytes]:
        sql = "SELECT json FROM resources WHERE practice=? AND type=? AND deleted_at IS NULL"
        args: list[Any] = [practice, rtype]
        if ids is not None:
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            args += ids
        rows = self.db.execute(sql + " ORDER BY rowid LIMIT ?", (*args, limit)).fetchall()
        return [bytes(r[0]) for r in rows]

    def types(self, practice: str) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT type FROM resources WHERE practice=?", (practice,)).fetchall()
        return sorted(str(r[0]) for r in rows)

    def export_rows(
        self,
        practice: str,
        rtype: str,
        *,
        until: int,
        since: int | None,
        group: str | None,
        patient_level: bool,
    ) -> Iterator[bytes]:
        """Resources of one type live at `until` and (with `since`) changed at or after it; streamed."""
        sql = (
            "SELECT json FROM resources WHERE practice=? AND type=? AND last_updated<=?"
            " AND (deleted_at IS NULL OR deleted_at>?)"
        )
        args: list[Any] = [practice, rtype, until, until]
        if since is not None:
            sql += " AND last_updated>=?"
            args.append(since)
        if group is not None:
            sql += " AND patient IN (SELECT patient FROM members WHERE practice=? AND group_id=?)"
            args += [practice, group]
        elif patient_level:
            sql += " AND patient IS NOT NULL"
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)  # own snapshot per job
        try:
            for (blob,) in conn.execute(sql + " ORDER BY rowid", args):
                yield bytes(blob)
        finally:
            conn.close()

    def deleted_rows(
        self,
        practice: str,
        types: list[str],
        *,
        since: int,
        until: int,
        group: str | None,
        patient_level: bool,
    ) -> Iterator[tuple[str, str]]:
        """(type, id) of resources deleted in [since, until]."""
        marks = ",".join("?" * len(types))
        sql = f"SELECT type, id FROM resources WHERE practice=? AND type IN ({marks}) AND deleted_at BETWEEN ? AND ?"
        args: list[Any] = [practice, *types, since, until]
        if group is not None:
            sql += " AND patient IN (SELECT patient FROM members WHERE practice=? AND group_id=?)"
            args += [practice, group]
        elif patient_level:
            sql += " AND patient IS NOT NULL"
        for rtype, rid in self.db.execute(sql + " ORDER BY deleted_at", args).fetchall():
            yield str(rtype), str(rid)
