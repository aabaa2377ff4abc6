"""One attachment's bytes on their way from the source to Medplum, in bounded memory.

A `Spool` takes the download chunk by chunk: it keeps up to `memory_bytes`
(load.attachment_memory_bytes) in memory and moves everything to a private scratch file once the
content grows past that (pfsync.core.private.anonymous_file: 0600, in the source's state directory,
with no name, so it never outlives the copy, whatever ends it). The SHA-1 and the size are taken
as the bytes arrive. The upload reads the spool back with `body()`: an iterable that starts again
from the first byte each time it is iterated, so a request re-sent after a 429 or a 401 sends the
whole content again (httpx refuses to re-send a consumed generator).

So one spool holds at most `memory_bytes` (plus one network chunk) in memory, however large the
attachment: the spools of the copies running at once bound the copies' memory
(pfsync.load.attachments).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from pfsync.core.private import anonymous_file

READ_CHUNK = 64 * 1024  # bytes read back from the scratch file per piece of the upload


def attachment_hash(sha1_digest: bytes) -> str:
    """FHIR's Attachment.hash of a content, from its SHA-1 digest: base64."""
    return base64.b64encode(sha1_digest).decode()


class Spool:
    """Bytes written once (`write`), then read back any number of times (`body`, `read_all`).
    Close it (or use it as a context manager): closing frees the scratch file."""

    def __init__(self, directory: Path, memory_bytes: int) -> None:
        self._directory = directory
        self._memory_bytes = memory_bytes
        self._chunks: list[bytes] = []  # the content while it fits in memory
        self._fd: int | None = None  # the scratch file once it does not
        self._sha1 = hashlib.sha1()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._sha1.update(chunk)
        self.size += len(chunk)
        if self._fd is None and self.size <= self._memory_bytes:
            self._chunks.append(chunk)
            return
        if self._fd is None:
            self._fd = anonymous_file(self._directory)
            for held in self._chunks:
                self._write_all(held)
            self._chunks = []
        self._write_all(chunk)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    @property
    def digest(self) -> str:
        """The content's SHA-1, base64 (FHIR's Attachment.hash)."""
        return attachment_hash(self._sha1.digest())

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int | None:
        """The scratch file's descriptor (None while the content is in memory)."""
        return self._fd

    def body(self) -> SpoolBody:
        """The content as a request body (send it with Content-Length: `size`)."""
        return SpoolBody(self)

    def chunks(self) -> Iterator[bytes]:
        """The content from its first byte, in pieces (each call starts again)."""
        if self._fd is None:
            yield from self._chunks
            return
        offset = 0
        while offset < self.size:
            piece = os.pread(self._fd, min(READ_CHUNK, self.size - offset), offset)
            if not piece:
                raise OSError(f"the attachment's scratch file ended at {offset} of {self.size} bytes")
            offset += len(piece)
            yield piece

    def read_all(self) -> bytes:
        """The whole content in memory: for what must be parsed whole (a FHIR Binary resource)."""
        return b"".join(self.chunks())

    def close(self) -> None:
        """Free the content (idempotent): the scratch file goes with its descriptor."""
        self._chunks = []
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SpoolBody:
    """A spool as an httpx request body: iterable again and again, each time from the first byte.

    Neither a generator nor file-like on purpose: httpx re-sends a plain iterable (a 401 answered
    by the token's renewal), where it refuses a consumed generator, and it would read a file-like
    object from its current position instead of from the start."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def __iter__(self) -> Iterator[bytes]:
        return self._spool.chunks()
