"""Streaming NDJSON reading: one resource at a time, with file and line for every problem.

Accepts plain or gzip files (sniffed by magic bytes, not the name), and also a single
pretty-printed JSON resource or Bundle: Practice Fusion's docs show output files served that way
(docs/practice-fusion.md, "Bulk export": sniff the format and accept both). Memory stays flat for
NDJSON: lines are read one by one, and a line longer than `max_line_bytes` is skipped (reported)
without ever being held whole. A pretty-printed document is parsed whole, bounded by the same cap.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from pfsync.core.errors import UsageError
from pfsync.core.fhir_types import R4_RESOURCE_TYPES

DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Record:
    """One resource read from a file. `line` is 1-based (the first line of a pretty document)."""

    path: Path
    line: int
    resource: dict[str, Any]
    raw: bytes  # the exact bytes of the line (without newline), for quarantine and hashing


@dataclass(frozen=True)
class BadLine:
    """A line that is not a usable FHIR resource, with the reason a user can act on."""

    path: Path
    line: int
    reason: str
    raw: bytes  # at most the first 1 KiB

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"

    @property
    def type_label(self) -> str:
        """The type to count this line under: the one its file's name gives (a Bulk Data output
        file, `Patient.ndjson`, `Observation.2.ndjson.gz`), else what is wrong with it."""
        return type_from_file_name(self.path) or (
            NO_TYPE_LABEL if self.reason == MISSING_TYPE else UNREADABLE_LABEL
        )


MISSING_TYPE = "missing resourceType"
NO_TYPE_LABEL = "(no resourceType)"
UNREADABLE_LABEL = "(unreadable)"


def type_from_file_name(path: Path) -> str | None:
    """The FHIR resource type that starts a file's name (`DiagnosticReport.1.ndjson`), or None."""
    first = path.name.split(".", 1)[0]
    return first if first in R4_RESOURCE_TYPES else None


Item = Record | BadLine


def open_binary(path: Path) -> IO[bytes]:
    """Open a file for reading bytes, transparently gunzipping it."""
    try:
        fh: IO[bytes] = open(path, "rb")  # noqa: SIM115 - returned to the caller
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    magic = fh.peek(2)[:2] if isinstance(fh, io.BufferedReader) else b""
    if magic == _GZIP_MAGIC:
        # Opened by name, so closing the GzipFile closes the file too (it never closes a `fileobj`).
        fh.close()
        return gzip.GzipFile(path, mode="rb")  # type: ignore[return-value]
    return fh


def _first_significant_byte(fh: IO[bytes]) -> bytes:
    """Peek at the first non-whitespace byte without consuming the stream."""
    if isinstance(fh, io.BufferedReader):
        head = fh.peek(4096)
    else:
        head = fh.peek(4096) if hasattr(fh, "peek") else b""
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    return stripped[:1]


def iter_file(path: Path, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Item]:
    """Yield a Record or BadLine per line of `path` (NDJSON), or per resource of a JSON document."""
    with open_binary(path) as fh:
        try:
            yield from _iter_stream(path, fh, max_line_bytes)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            # A truncated gzip or an I/O error ends the file; what was read stays good.
            yield BadLine(
                path, 0, f"file unreadable after the last good line: {exc.__class__.__name__}: {exc}", b""
            )


def _iter_stream(path: Path, fh: IO[bytes], max_line_bytes: int) -> Iterator[Item]:
    """The first usable line decides: NDJSON (one object per line), or a pretty-printed document."""
    line_no = 0
    while True:  # blank and over-long lines before the first usable one
        line, too_long = _read_line(fh, max_line_bytes)
        if line is None:
            return
        line_no += 1
        if too_long:
            yield _too_long(path, line_no, line, max_line_bytes)
        elif stripped := line.strip():
            break
    rest: IO[bytes] | _Chain = fh
    if stripped.startswith(b"{") and not _parses(stripped):
        # Not one JSON object per line: maybe a pretty-printed document.
        ahead = fh.read(max_line_bytes + 1)
        document = line + ahead
        if len(document) <= max_line_bytes and _parses(document):
            yield from _from_document(path, line_no, orjson.loads(document), document)
            return
        yield _bad_json(path, line_no, stripped)
        # Not a document either: go on line by line over what was read ahead, then the rest.
        rest = _Chain(ahead, fh)
    else:
        yield _to_item(path, line_no, stripped)
    yield from _iter_lines(path, rest, line_no, max_line_bytes)


class _Chain:
    """readline() over bytes already read ahead, then the stream they came from (a line split
    between the two is joined), so sniffing for a pretty document never loses what follows."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def readline(self, size: int = -1) -> bytes:
        line = self._head.readline(size)
        if line.endswith(b"\n") or (size > 0 and len(line) >= size):
            return line
        more = self._rest.readline(size - len(line) if size > 0 else -1)
        return line + more


def _iter_lines(path: Path, fh: IO[bytes] | _Chain, line_no: int, max_line_bytes: int) -> Iterator[Item]:
    while True:
        line, too_long = _read_line(fh, max_line_bytes)
        if line is None:
            return
        line_no += 1
        if too_long:
            yield _too_long(path, line_no, line, max_line_bytes)
        elif stripped := line.strip():
            yield _to_item(path, line_no, stripped)


def _too_long(path: Path, line_no: int, head: bytes, max_line_bytes: int) -> BadLine:
    return BadLine(path, line_no, f"line longer than {max_line_bytes} bytes, skipped", head[:1024])


def _read_line(fh: IO[bytes] | _Chain, max_line_bytes: int) -> tuple[bytes | None, bool]:
    """One line without its newline, or (None, False) at EOF. Over-long lines are drained, not kept."""
    line = fh.readline(max_line_bytes + 1)
    if not line:
        return None, False
    if len(line) > max_line_bytes and not line.endswith(b"\n"):
        head = line[:1024]
        while True:
            more = fh.readline(_READ_CHUNK)
            if not more or more.endswith(b"\n"):
                break
        return head, True
    return line.rstrip(b"\r\n"), False


def _parses(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _bad_json(path: Path, line_no: int, raw: bytes) -> BadLine:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return BadLine(path, line_no, f"not valid JSON: {exc}", raw[:1024])
    return BadLine(path, line_no, "not valid JSON", raw[:1024])


def _to_item(path: Path, line_no: int, raw: bytes) -> Item:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "not valid UTF-8" if "utf-8" in str(exc).lower() else f"not valid JSON: {exc}"
        return BadLine(path, line_no, reason, raw[:1024])
    return check_resource(path, line_no, value, raw)


def check_resource(path: Path, line_no: int, value: Any, raw: bytes) -> Item:
    """A Record if `value` looks like a FHIR resource, else a BadLine saying why."""
    if not isinstance(value, dict):
        return BadLine(path, line_no, f"expected a JSON object, got {type(value).__name__}", raw[:1024])
    rtype = value.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return BadLine(path, line_no, MISSING_TYPE, raw[:1024])
    if not rtype.isascii() or not rtype.isalpha() or not rtype[0].isupper():
        return BadLine(path, line_no, f"resourceType {rtype[:60]!r} is not a FHIR type name", raw[:1024])
    return Record(path, line_no, value, raw)


def _from_document(path: Path, line_no: int, doc: Any, raw: bytes) -> Iterator[Item]:
    """A pretty-printed resource, or a Bundle whose entries are the resources."""
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" and isinstance(doc.get("entry"), list):
        for entry in doc["entry"]:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if resource is None:
                continue
            yield check_resource(path, line_no, resource, orjson.dumps(resource))
        return
    yield check_resource(path, line_no, doc, orjson.dumps(doc) if isinstance(doc, dict) else raw[:1024])


# An export directory's bookkeeping (pfsync.source.exportjob): never data to load.
_BOOKKEEPING = ("manifest.json", "job.json")
_DATA_SUFFIXES = (".ndjson", ".ndjson.gz", ".json")
# pfsync.source.exportjob file_name(): OperationOutcomes and Bulk Data v2 deletions, not resources to upsert.
_NOT_OUTPUT = re.compile(r"(error|deleted)\.\d+\.ndjson(\.gz)?")


def walk_files(directory: Path) -> Iterator[Path]:
    """Data files under `directory` and its subdirectories (`pfsync export` writes one per group),
    in a stable order; hidden entries (`.<name>.part` downloads in flight, temp files),
    manifest.json and job.json are skipped."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name in _BOOKKEEPING or not name.endswith(_DATA_SUFFIXES):
                continue
            if (path := Path(root) / name).is_file():
                yield path


def is_output_name(name: str) -> bool:
    """False for an export's error.<n>.ndjson / deleted.<n>.ndjson files."""
    return _NOT_OUTPUT.fullmatch(name) is None


def iter_paths(paths: list[Path]) -> Iterator[Path]:
    """Expand files and directories into the NDJSON files to load, in a stable order.

    Directories are searched recursively and yield only resource files (`walk_files`, without
    error/deleted files: pfsync.source.exportjob.export_files classifies those). A file named
    explicitly is yielded as given.
    """
    for path in paths:
        if path.is_dir():
            yield from (p for p in walk_files(path) if is_output_name(p.name))
        elif path.exists():
            yield path
        else:
            raise UsageError(f"{path}: no such file or directory")
