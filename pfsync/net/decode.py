"""Bounded decoding of response bodies: Content-Encoding (identity, gzip, deflate) undone in pieces
of at most DECODE_CHUNK bytes, so a gzip bomb never inflates whole; `BoundedBody` refuses an answer
read whole past http.max_response_bytes.

May import: pfsync.core, pfsync.net.responses.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from pfsync.core.errors import ProtocolError
from pfsync.core.netpolicy import shown_url
from pfsync.net.responses import server_text

# Largest piece one decompression step may produce: a gzip bomb (1000:1) is inflated in pieces of
# this size, never whole, so memory stays bounded whatever the ratio.
DECODE_CHUNK = 256 * 1024
ACCEPT_ENCODING = "gzip, deflate"


def iter_decoded(response: httpx.Response) -> Iterator[bytes]:
    """The body of a streamed response, its Content-Encoding (identity, gzip, deflate) undone in
    pieces of at most DECODE_CHUNK bytes (httpx's own decoder inflates a whole network read at
    once). Send `Accept-Encoding: ACCEPT_ENCODING` and the STREAMED extension with the request.
    ProtocolError for another encoding or a body that does not decode."""
    if response.is_stream_consumed:  # already read (httpx.MockTransport's answers are): decoded
        yield response.content
        return
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    where = f"{response.request.method} {shown_url(str(response.request.url))}"
    if encoding not in DECODABLE:
        raise ProtocolError(f"{where}: unsupported Content-Encoding {server_text(encoding)!r}")
    yield from _decode(response.iter_raw(), encoding, where)


DECODABLE = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


def _decode(raws: Iterable[bytes], encoding: str, where: str) -> Iterator[bytes]:
    """Undo `encoding` over raw pieces, yielding at most DECODE_CHUNK bytes at a time."""
    if encoding in ("", "identity"):
        yield from raws
        return
    decoder: Any = None
    for raw in raws:
        if decoder is None:
            if encoding == "deflate":  # RFC 9110 says zlib framing; some servers send raw deflate
                decoder = zlib.decompressobj(zlib.MAX_WBITS if raw[:1] == b"\x78" else -zlib.MAX_WBITS)
            else:
                decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        data = raw
        while data:
            try:
                out = decoder.decompress(data, DECODE_CHUNK)
            except zlib.error:
                raise ProtocolError(
                    f"{where}: the body is not valid {encoding} although its Content-Encoding says so"
                ) from None
            if out:
                yield out
            data = decoder.unconsumed_tail
            if decoder.eof:
                break
    if decoder is not None and not decoder.eof:
        # A body cut short: the caller sees fewer bytes (and decides, as for a dropped connection).
        tail = decoder.flush()
        if tail:
            yield tail


class BoundedBody(httpx.SyncByteStream):
    """A response body decoded in bounded pieces and refused past `limit` decoded bytes."""

    def __init__(self, raw: httpx.SyncByteStream, encoding: str, limit: int, where: str) -> None:
        self._raw, self._encoding, self._limit, self._where = raw, encoding, limit, where

    def __iter__(self) -> Iterator[bytes]:
        total = 0
        for piece in _decode(self._raw, self._encoding, self._where):
            total += len(piece)
            if total > self._limit:
                raise ProtocolError(f"{self._where}: the answer is larger than {self._limit} bytes "
                                    "(http.max_response_bytes)")  # fmt: skip
            yield piece

    def close(self) -> None:
        # httpx's own stream refers back to its response (Response -> this -> BoundSyncStream ->
        # Response): left in place, every answer read whole was cyclic garbage, freed only by the
        # cyclic collector, which a load runs seldom (pfsync.core.tuning). Bundle answers and their
        # requests' bodies (~0.1 MB each) piled up by the hundred: the RSS of a first sync grew with
        # the practice. Dropping the reference once the body is read frees them at once.
        raw, self._raw = self._raw, _CLOSED
        raw.close()


_CLOSED = httpx.ByteStream(b"")
