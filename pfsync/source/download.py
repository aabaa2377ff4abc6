"""Export file downloads: streamed to disk, validated as they stream, retried, resumed, landed atomically.

docs/bulk-data.md "Download": never hold a whole file in memory; accept gzip; retry 408/429/5xx and
connection resets with backoff, resuming with `Range` when the server answers 206 (else the file
restarts); send the token only when `requiresAccessToken` and only to allowed origins. Every line
is checked as it arrives (framing and resourceType, or full JSON with export.validate = "full";
see the comment above Validator), its length capped, and counted against the manifest `count`.
A pretty-printed JSON resource or Bundle (docs/practice-fusion.md: PF's docs show one served as
application/json) is converted to NDJSON, so the export directory only ever holds NDJSON.
A file whose content looks damaged (bad lines, cut short, fewer lines than announced) is downloaded
again; when a second download is byte-identical to the first, or the damage persists after
CONTENT_RETRIES, it lands as received, with every problem reported once (the loader quarantines
the bad lines).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from pfsync.core.errors import AuthError, ExportError, HTTPError, InterruptedRunError, ProtocolError
from pfsync.core.events import EventSink
from pfsync.core.private import create_exclusive
from pfsync.core.redact import redact
from pfsync.core.settings import ExportValidate
from pfsync.net.http import (
    ACCEPT_ENCODING,
    DECODE_CHUNK,
    DOWNLOAD_RULES,
    STREAMED,
    Clock,
    Retrier,
    RetryPolicy,
    classify,
    iter_decoded,
    outcome_text,
)
from pfsync.source.bulk import Issue, JobExpired, ManifestFile, Origins, issues_of
from pfsync.source.exportjob import ExportDir, LandedFile, fsync_dir, without_query

log = logging.getLogger("pfsync.export")
_GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY = 8 * 1024 * 1024
_MAX_PROBLEMS = 50
CONTENT_RETRIES = 2  # re-downloads of a file whose content looks damaged


# What "structure" checks, and why it is enough while streaming (export.validate, the default):
# scripts/bench_export measured orjson.loads of every line at ~340 MB/s on a 2-core machine, below
# a bare loopback download (~305-410 MB/s), and it holds the GIL, so full parsing capped the
# download at 31-46 % of bare httpx. The structural check (each line starts with `{`, ends with `}`,
# names `"resourceType"` = the manifest's type, is not longer than the cap; line count against the
# manifest `count`) runs at GB/s because a clean 1 MiB block is checked with a few bytes.count()
# calls. A line that fails it is parsed to give a precise reason, and the last line of a file
# always is (truncation). Full JSON validity of the other lines is left to the loader, which parses
# every line anyway and quarantines an unparsable one with file and line (pfsync.core.ndjson BadLine).
# export.validate = "full" parses every line here too (the behaviour before this setting existed).
# After the change (bench_export, 2 cores shared with the sandbox): validator alone ~890 MB/s vs
# ~165 MB/s in full mode; ~1 GB export at 80 % of bare httpx (full: 28 %), 107 MB at 46 %.
_RESOURCE_TYPE = re.compile(rb'"resourceType"\s*:\s*"([A-Za-z]+)"')
# Bytes handed to the validator at once. Measured (in-memory, Observation file): 64-256 KiB blocks
# ~800 MB/s, 1 MiB blocks ~420 MB/s: the block's passes (2 counts, sha256, write) stay in cache.
FEED_BYTES = 256 * 1024


@dataclass
class Validator:
    """Streaming checker and normaliser of one file: bytes in, NDJSON lines out to `out`."""

    out: IO[bytes]
    expected_type: str
    max_line_bytes: int
    unpack_bundles: bool = True
    mode: ExportValidate = "structure"
    lines: int = 0
    written: int = 0
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    types: Counter[str] = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)
    collect_issues: bool = False
    truncated: bool = False
    max_bytes: int | None = None  # export.max_file_bytes: decoded bytes one file may have
    name: str = "the file"
    fed: int = 0  # decoded bytes taken so far
    long_lines: int = 0  # lines over max_line_bytes: dropped, and no reason to fetch the file again
    _digest: Any = field(default_factory=hashlib.sha256)
    _buffer: bytearray = field(default_factory=bytearray)  # sniff/document modes only
    _pending: list[bytes | bytearray] = field(default_factory=list)  # the start of a line still arriving
    _pending_bytes: int = 0
    _line_no: int = 0
    _skipping: bool = False
    _mode: str = "sniff"  # sniff -> lines | document
    _gunzip: Any = None
    _head: bytes = b""
    _prefix: bytes = b""
    _boundary: bytes = b""

    def __post_init__(self) -> None:
        if self.collect_issues:
            self.mode = "full"  # error files are parsed for their issues anyway (and are small)
        # How orjson, HAPI and the sandbox write a resource: its type first, no spaces.
        self._prefix = b'{"resourceType":"' + self.expected_type.encode() + b'"'
        self._boundary = b"}\n" + self._prefix

    @property
    def sha256(self) -> str:
        return str(self._digest.hexdigest())

    def feed(self, data: bytes | bytearray) -> None:
        if self._gunzip is None and self._head is not None:
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, None  # type: ignore[assignment]
            # Gzip sniffed by magic bytes, not by name or header (a server may gzip without saying so).
            self._gunzip = zlib.decompressobj(wbits=31) if data[:2] == _GZIP_MAGIC else False
        if not self._gunzip:
            self._take(data)
            return
        while data:  # inflated in bounded pieces: a gzip bomb never sits in memory whole
            try:
                piece = self._gunzip.decompress(data, DECODE_CHUNK)
            except zlib.error as exc:
                raise ExportError(f"{self.name} is not valid gzip: {exc}") from None
            self._take(piece)
            data = self._gunzip.unconsumed_tail
            if self._gunzip.eof:
                break

    def _take(self, data: bytes | bytearray) -> None:
        self.fed += len(data)
        if self.max_bytes is not None and self.fed > self.max_bytes:
            raise ProtocolError(
                f"{self.name} is larger than {self.max_bytes} bytes (export.max_file_bytes); the export "
                "is refused",
                hint="if a file this large is real, raise PFSYNC_MAX_FILE_BYTES",
            )
        if self._mode != "lines":
            self._buffer += data
            if self._mode == "sniff" and not self._sniff(final=False):
                return
            if self._mode == "document":
                if len(self._buffer) <= self.max_line_bytes:
                    return
                self._problem(f"document larger than {self.max_line_bytes} bytes")
                self._mode = "lines"
            data, self._buffer = self._buffer, bytearray()
            self._lines(data, owned=True)  # handed over, not copied: it may be max_line_bytes long
            return
        self._lines(data)

    def _lines(self, data: bytes | bytearray, *, owned: bool = False) -> None:
        """NDJSON mode: hand every complete line on to _block; keep the unfinished last one.
        Blocks are passed as offsets into `data`: no slice of the whole chunk is copied."""
        start = 0
        if self._skipping:  # the rest of an over-long line, already reported
            end = data.find(b"\n")
            if end < 0:
                return
            self._skipping = False
            start = end + 1
        cut = data.rfind(b"\n", start) + 1
        if cut == 0:  # `data` may be the caller's reused buffer: what is kept is copied
            self._pending.append(data if owned and not start else bytes(data[start:]))
            self._pending_bytes += len(data) - start
            if self._pending_bytes > self.max_line_bytes:
                self._line_no += 1
                self.bad_lines += 1
                self.long_lines += 1
                self._problem(f"line {self._line_no} is longer than {self.max_line_bytes} bytes; dropped")
                self._pending, self._pending_bytes, self._skipping = [], 0, True
            return
        if self._pending:  # the line the previous chunk started: only it is glued together
            first = data.find(b"\n", start) + 1
            line = b"".join((*self._pending, data[start:first]))
            self._pending, self._pending_bytes = [], 0
            self._block(line, 0, len(line))
            start = first
        if start < cut:
            self._block(data, start, cut)
        if cut < len(data):
            self._pending, self._pending_bytes = [bytes(data[cut:])], len(data) - cut

    def _block(self, data: bytes | bytearray, start: int, end: int) -> None:
        """Complete lines `data[start:end]` (ending with a newline): checked as one block, or line
        by line if that fails."""
        n = data.count(b"\n", start, end)
        if (
            self.mode == "structure"
            and end - start <= self.max_line_bytes  # then no line in it can be longer
            # A raw newline cannot occur inside JSON, so each newline ends exactly one line: the
            # first line starts with the prefix, the last ends with "}", and every boundary between
            # two lines reads "}\n" + prefix, so no line is blank, has a CR or lacks the prefix.
            and data.startswith(self._prefix, start)
            and data.endswith(b"}\n", start, end)
            and data.count(self._boundary, start, end) == n - 1
        ):
            self._line_no += n
            self.types[self.expected_type] += n
            self._write(data if end - start == len(data) else memoryview(data)[start:end], n)
            return
        self._by_line(bytes(data[start:end]), final=False)

    def _sniff(self, *, final: bool) -> bool:
        """Decide between NDJSON and one pretty-printed document from the first non-blank line."""
        start = 0
        while start < len(self._buffer) and self._buffer[start] in b" \t\r\n":
            start += 1
        if start == len(self._buffer) and not final:
            return False
        newline = self._buffer.find(b"\n", start)
        # Only a first line that starts with "{" can open a document: anything else is decided at once.
        if (
            newline < 0
            and not final
            and len(self._buffer) <= self.max_line_bytes
            and self._buffer[start] == 0x7B
        ):
            return False
        first = bytes(self._buffer[start : newline if newline >= 0 else len(self._buffer)]).strip()
        # docs/practice-fusion.md: a pretty-printed resource's first line is "{" alone, which is not JSON.
        self._mode = "document" if first.startswith(b"{") and not _parses(first) else "lines"
        return True

    def _by_line(self, block: bytes, *, final: bool) -> None:
        """Check line by line; blank lines and CRs are dropped from the output (NDJSON normalised).
        `final`: the block is the end of the file, its last piece may lack its newline."""
        raws = block.split(b"\n")
        kept: list[bytes] = []
        for index, raw in enumerate(raws):
            line = raw.strip()
            if not line:
                continue
            self._line_no += 1
            if len(line) > self.max_line_bytes:
                self.bad_lines += 1
                self.long_lines += 1
                self._problem(f"line {self._line_no} is longer than {self.max_line_bytes} bytes; dropped")
                continue
            kept.append(line)
            # The last piece of a final block had no newline: if it does not parse, the file was cut.
            self._check(line, final_fragment=final and index == len(raws) - 1)
        if kept:
            self._write(b"\n".join(kept) + b"\n", len(kept))

    def _check(self, line: bytes, *, final_fragment: bool) -> None:
        if self.mode == "structure" and not final_fragment and line[:1] == b"{" and line[-1:] == b"}":
            found = _RESOURCE_TYPE.search(line)
            if found is not None and found.group(1).decode() == self.expected_type:
                self.types[self.expected_type] += 1
                return
            # Anything else is parsed: the reason (bad JSON, no or another type) must be precise.
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self.bad_lines += 1
            if final_fragment:
                self.truncated = True
                self._problem(f"line {self._line_no} is cut short (the file ends mid-line)")
            else:
                self._problem(f"line {self._line_no} is not valid JSON: {exc}")
            return
        rtype = value.get("resourceType") if isinstance(value, dict) else None
        if not isinstance(rtype, str):
            self.bad_lines += 1
            self._problem(f"line {self._line_no} is not a FHIR resource (no resourceType)")
            return
        self.types[rtype] += 1
        if self.collect_issues and len(self.issues) < 1000:
            self.issues += issues_of(value)

    def _write(self, data: bytes | bytearray | memoryview, lines: int) -> None:
        self.out.write(data)
        self._digest.update(data)  # hashlib releases the GIL for large buffers
        self.written += len(data)
        self.lines += lines

    def _problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)

    def finish(self) -> None:
        if self._head:  # fewer than two bytes in the whole body
            data, self._head = self._head, None  # type: ignore[assignment]
            self._gunzip = False
            self._take(data)
        if self._gunzip:
            try:
                tail = self._gunzip.flush()
            except zlib.error as exc:
                raise ExportError(f"the file is not valid gzip: {exc}") from None
            if not self._gunzip.eof:
                self.truncated = True
                self._problem("the gzip stream is cut short")
            self._take(tail)
        if self._mode == "sniff":
            self._sniff(final=True)
        if self._mode == "document":
            try:
                value = orjson.loads(bytes(self._buffer))
            except orjson.JSONDecodeError:
                self._mode = "lines"  # not a document after all: report it line by line
            else:
                self._buffer.clear()
                resources = [orjson.dumps(r) for r in self._resources(value)]
                for line in resources:
                    self._line_no += 1
                    self._check(line, final_fragment=False)
                if resources:
                    self._write(b"\n".join(resources) + b"\n", len(resources))
                return
        rest = b"".join((bytes(self._buffer), *self._pending))
        self._buffer, self._pending, self._pending_bytes = bytearray(), [], 0
        if rest and not self._skipping:
            self._by_line(rest, final=True)

    def _resources(self, value: Any) -> Iterator[Any]:
        if (
            self.unpack_bundles
            and isinstance(value, dict)
            and value.get("resourceType") == "Bundle"
            and isinstance(value.get("entry"), list)
        ):
            for entry in value["entry"]:
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    yield entry["resource"]
            return
        yield value

    def summary_problems(self, count: int | None) -> list[str]:
        """Problems plus the whole-file checks: count against the manifest, unexpected types."""
        found = list(self.problems)
        if count is not None and count != self.lines:
            found.append(f"{self.lines} lines but the manifest announced {count}")
        for rtype, n in sorted(self.types.items()):
            if rtype != self.expected_type:
                found.append(f"{n} resource(s) of type {rtype} in a {self.expected_type} file")
        return found

    def damaged(self, count: int | None) -> bool:
        """Worth downloading again: bad lines, a cut-short end, or fewer lines than announced. A line
        over the length cap is not: the same server sends the same line again."""
        return (
            self.bad_lines > self.long_lines or self.truncated or (count is not None and self.lines < count)
        )


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


@dataclass(frozen=True)
class Downloaded:
    """A landed file plus what its validation found."""

    landed: LandedFile
    problems: tuple[str, ...] = ()
    issues: tuple[Issue, ...] = ()


@dataclass
class Downloader:
    """Downloads manifest files into an ExportDir. Thread-safe: one instance serves the worker pool."""

    client: httpx.Client
    auth: httpx.Auth | None
    origins: Origins
    export_dir: ExportDir
    policy: RetryPolicy
    clock: Clock
    events: EventSink
    export_id: str
    requires_access_token: bool = True
    max_line_bytes: int = 64 * 1024 * 1024
    stop: threading.Event | None = None
    validate: ExportValidate = "structure"
    max_file_bytes: int | None = None  # export.max_file_bytes
    max_export_bytes: int | None = None  # export.max_export_bytes, over every file of this Downloader
    deadline_at: float | None = None  # clock time the export (downloads included) must end by
    _received: int = 0
    _received_lock: threading.Lock = field(default_factory=threading.Lock)

    def _account(self, more: int) -> None:
        """Count decoded bytes against the per-export limit (every thread's downloads together)."""
        with self._received_lock:
            self._received += more
            total = self._received
        if self.max_export_bytes is not None and total > self.max_export_bytes:
            raise ProtocolError(
                f"the export's files add up to more than {self.max_export_bytes} bytes "
                "(export.max_export_bytes); the export is refused",
                hint="if an export this large is real, raise PFSYNC_MAX_EXPORT_BYTES",
            )

    def _check_deadline(self, url: str) -> None:
        if self.deadline_at is not None and self.clock.now() > self.deadline_at:
            raise ExportError(
                f"the export did not complete before the deadline (export.deadline) while downloading "
                f"{url}; complete files are kept and the next run resumes",
                hint="raise PFSYNC_EXPORT_DEADLINE if the source is just slow",
            )

    def download(self, entry: ManifestFile, name: str) -> Downloaded:
        """Download `entry` to `name` in the export directory; returns it once landed (renamed)."""
        auth = self.origins.auth_for(entry.url, self.auth) if self.requires_access_token else None
        url = without_query(entry.url)
        self.events.emit("download_request", exportId=self.export_id, fileUrl=url, name=name,
                         type=entry.type, kind=entry.kind, count=entry.count)  # fmt: skip
        started = self.clock.now()
        part = self.export_dir.part_path(name)
        # An error file's `count` is not its line count (the reference server copies the failed
        # output's count onto it): only output and deleted files are checked (docs/export-decisions.md
        # "Downloads that do not match the manifest").
        count = entry.count if entry.kind != "error" else None
        try:
            previous: str | None = None
            for content_try in range(CONTENT_RETRIES + 1):
                validator = self._fetch(entry, name, part, auth)
                if not validator.damaged(count) or content_try == CONTENT_RETRIES:
                    break
                if validator.sha256 == previous:
                    # The same bytes twice: this is what the server has (e.g. a wrong `count` in its
                    # manifest); a third download would only cost time. Kept, and reported once below.
                    break
                if previous is None:
                    self.events.emit("download_error", exportId=self.export_id, fileUrl=url, name=name,
                                     message="; ".join(validator.summary_problems(count)[:3]),
                                     willRetry=True)  # fmt: skip
                previous = validator.sha256
            final = self.export_dir.path / name
            os.replace(part, final)
            fsync_dir(final.parent)
        finally:
            part.unlink(missing_ok=True)
        problems = tuple(f"{name}: {p}" for p in validator.summary_problems(count))
        for problem in problems:
            log.warning("%s", problem)
        landed = LandedFile(type=entry.type, path=final, sha256=validator.sha256, lines=validator.lines,
                            kind=entry.kind, bytes=validator.written, count=entry.count, url=url)  # fmt: skip
        self.events.emit("download_complete", exportId=self.export_id, fileUrl=url, name=name, type=entry.type,
                         kind=entry.kind, lines=validator.lines, bytes=validator.written,
                         seconds=round(self.clock.now() - started, 3), problems=len(problems))  # fmt: skip
        return Downloaded(landed, problems, tuple(validator.issues))

    def _fetch(self, entry: ManifestFile, name: str, part: Path, auth: httpx.Auth | None) -> Validator:
        """One complete pass over the file into `part` (with Range resumes), validated. Every
        failed attempt (a restart, a resume, a temporary answer) is decided by one Retrier."""
        retrier = Retrier("GET", without_query(entry.url), self.policy, self.clock, DOWNLOAD_RULES, self.stop)
        while True:  # each pass starts from byte 0 with a fresh validator
            with os.fdopen(create_exclusive(part), "wb") as out:  # O_EXCL, 0600, never a link
                validator = Validator(out, entry.type, self.max_line_bytes,
                                      unpack_bundles=entry.type != "Bundle", mode=self.validate,
                                      collect_issues=entry.kind == "error", max_bytes=self.max_file_bytes,
                                      name=name)  # fmt: skip
                offset = 0
                while True:
                    try:
                        offset = self._stream(entry, name, auth, validator, offset)
                    except _Restart as restart:
                        if restart.cause is not None:
                            self._retry_or_raise(entry, name, restart.cause, retrier)
                        break
                    except _Dropped as dropped:
                        offset = dropped.received
                        self._retry_or_raise(entry, name, dropped.cause, retrier)
                        continue
                    except (httpx.TransportError, _Temporary) as exc:
                        self._retry_or_raise(entry, name, exc, retrier)
                        continue
                    validator.finish()
                    out.flush()
                    os.fsync(out.fileno())
                    return validator

    def _retry_or_raise(self, entry: ManifestFile, name: str, exc: Exception, retrier: Retrier) -> None:
        response = exc.response if isinstance(exc, _Temporary) else None
        message = (
            f"HTTP {response.status_code}" + (f": {outcome_text(response)}" if outcome_text(response) else "")
            if response is not None
            else f"{exc.__class__.__name__}: {redact(str(exc))}"
        )
        self._check_deadline(without_query(entry.url))
        delay = retrier.next_wait(response)
        self.events.emit("download_error", exportId=self.export_id, fileUrl=without_query(entry.url),
                         name=name, message=message, attempt=retrier.attempt, willRetry=delay is not None)  # fmt: skip
        if delay is None:
            raise HTTPError(
                f"download of {redact(without_query(entry.url))} failed after {self.policy.retries} retries: {message}",
                method="GET",
                url=without_query(entry.url),
                status=response.status_code if response is not None else None,
            )
        retrier.pause(delay, "export")

    def _stream(
        self, entry: ManifestFile, name: str, auth: httpx.Auth | None, validator: Validator, offset: int
    ) -> int:
        """Stream from byte `offset` on; returns the offset when the body ended."""
        headers = {"Accept": "application/fhir+ndjson", "Accept-Encoding": ACCEPT_ENCODING}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = self.client.build_request("GET", entry.url, headers=headers, extensions={STREAMED: True})
        response = self.client.send(request, auth=auth, stream=True)
        url = redact(without_query(entry.url))
        try:
            status = response.status_code
            if offset and (status in (200, 416) or (
                status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
            )):  # fmt: skip
                raise _Restart(None)  # Range not honoured: start the file again from byte 0
            if status not in (200, 206):
                response.read()
                if status in (401, 403):
                    raise AuthError(
                        f"download of {url} refused ({status}): {outcome_text(response) or 'no reason'}"
                    )
                if status in (404, 410):
                    raise JobExpired(f"file {url} is gone ({status}): the export expired or was deleted")
                if classify(response, DOWNLOAD_RULES) == "retry":
                    raise _Temporary(response)
                raise ExportError(
                    f"download of {url} failed ({status}): {outcome_text(response) or 'no reason'}"
                )
            # Range offsets count encoded bytes: with a Content-Encoding we can only restart.
            encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            next_progress = offset + _PROGRESS_EVERY
            # The socket yields reads of up to 64 KiB; they are gathered into one reused buffer
            # and the validator gets FEED_BYTES at once, so its per-call work is paid per block.
            # Reused, not joined: a fresh 256 KiB bytes per block is mmap'd by malloc and costs
            # as much in page faults as the whole structural check (py-spy, scripts/bench_export).
            buf, size = bytearray(FEED_BYTES), 0
            try:
                for chunk in iter_decoded(response):
                    # Per network read: a trickle cannot outlast the deadline or a SIGTERM.
                    self._check_deadline(url)
                    if self.stop is not None and self.stop.is_set():
                        raise InterruptedRunError(
                            "export interrupted; complete files are kept and the next run resumes"
                        )
                    view = memoryview(chunk)
                    while view:
                        take = min(len(view), FEED_BYTES - size)
                        buf[size : size + take] = view[:take]
                        size += take
                        view = view[take:]
                        if size < FEED_BYTES:
                            break
                        fed = validator.fed
                        validator.feed(buf)  # borrowed: the validator copies what it keeps
                        self._account(validator.fed - fed)
                        offset, size = offset + size, 0
                        if offset >= next_progress:
                            next_progress = offset + _PROGRESS_EVERY
                            self.events.emit(
                                "download_progress", exportId=self.export_id, name=name, bytes=offset
                            )
            except httpx.TransportError as exc:
                if size:  # what did arrive is good
                    validator.feed(bytes(buf[:size]))
                    offset += size
                if encoded:
                    raise _Restart(exc) from None
                raise _Dropped(offset, exc) from None
            if self.stop is not None and self.stop.is_set():
                raise InterruptedRunError(
                    "export interrupted; complete files are kept and the next run resumes"
                )
            if size:
                fed = validator.fed
                validator.feed(bytes(buf[:size]))
                self._account(validator.fed - fed)
            return offset + size
        finally:
            response.close()


class _Restart(Exception):
    """Start the file again from byte 0 (`cause`: the failure that counts as an attempt, if any)."""

    def __init__(self, cause: Exception | None) -> None:
        super().__init__("restart")
        self.cause = cause


class _Dropped(Exception):
    """The connection dropped mid-body after `received` bytes: resume from there with Range."""

    def __init__(self, received: int, cause: Exception) -> None:
        super().__init__(f"connection lost after {received} bytes")
        self.received = received
        self.cause = cause


class _Temporary(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
