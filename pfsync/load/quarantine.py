"""The quarantine (resources Medplum refused) and the retry queue (retries ran out), both NDJSON.

`{state_dir}/{source}/quarantine.ndjson` and `retry.ndjson` (preamble: state dir layout). Every
line wraps the source resource as it was read, with where it came from and why it is here, so
nothing is dropped silently and `pfsync load` can replay either file:

    {"pfsync": "quarantine", "file": ..., "line": 12, "type": "Patient", "id": "123",
     "status": 400, "reason": "Invalid additional property \"foo\"", "resource": {...}}

A line that was not JSON keeps its text under "raw" instead of "resource".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from pfsync.core.ndjson import BadLine, Item, Record, check_resource, open_binary
from pfsync.core.private import open_private, private_dir

QUARANTINE = "quarantine"
RETRY = "retry"


class WrappedLog:
    """An append-only NDJSON file of wrapped resources, opened on first use, flushed per line."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.count = 0
        self._fh: IO[bytes] | None = None

    def add(
        self, *, file: str | None, line: int | None, reason: str, raw: bytes, status: int | None = None,
        rtype: str | None = None, sid: str | None = None,
    ) -> None:  # fmt: skip
        record: dict[str, Any] = {"pfsync": self.kind, "file": file, "line": line, "type": rtype, "id": sid,
                                  "status": status, "reason": reason}  # fmt: skip
        try:
            record["resource"] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record["raw"] = raw.decode("utf-8", errors="replace")
        if self._fh is None:
            private_dir(self.path.parent)
            fd = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._fh = os.fdopen(fd, "ab")  # kept open for the run
        self._fh.write(orjson.dumps(record) + b"\n")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def is_wrapped(path: Path) -> bool:
    """True when the file's first line is one of our quarantine / retry records."""
    try:
        with open_binary(path) as fh:
            first = fh.readline(16 * 1024 * 1024)
    except Exception:
        return False
    try:
        doc = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("pfsync") in (QUARANTINE, RETRY) and "reason" in doc


def iter_wrapped(path: Path) -> Iterator[Item]:
    """The resources of a quarantine / retry file, with their original file and line."""
    with open_binary(path) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield BadLine(path, n, f"not valid JSON: {exc}", line[:1024])
                continue
            if not isinstance(doc, dict):
                yield BadLine(path, n, "expected a JSON object", line[:1024])
                continue
            origin = Path(str(doc.get("file") or path))
            line_no = doc.get("line")
            origin_line = line_no if isinstance(line_no, int) else n
            resource = doc.get("resource")
            if resource is None:
                raw = str(doc.get("raw", "")).encode()
                yield BadLine(origin, origin_line, str(doc.get("reason") or "unreadable line"), raw[:1024])
                continue
            item = check_resource(origin, origin_line, resource, orjson.dumps(resource))
            yield item if isinstance(item, BadLine) else Record(item.path, item.line, item.resource, item.raw)


def take(path: Path) -> Path | None:
    """Move a queue file aside for replay (so new failures append to a fresh file); None if absent.

    A file left aside by a crashed replay is picked up again by the next call (see `pending`)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    n = 0
    while True:
        aside = path.with_name(f"{path.name}.replay-{n}")
        if not aside.exists():
            break
        n += 1
    os.replace(path, aside)
    return aside


def pending(path: Path) -> list[Path]:
    """Replay files left aside earlier (`take`), oldest first."""
    found = sorted(path.parent.glob(path.name + ".replay-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return [p for p in found if p.name.rsplit("-", 1)[1].isdigit()]
