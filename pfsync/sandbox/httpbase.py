"""A tiny threaded HTTP/1.1 server on loopback that both sandboxes build on (stdlib only).

Why the standard library: `pfsync sandbox` must work after a plain `pip install pfsync`, with no
web framework among the runtime dependencies. Handlers get a parsed `Request` and return a
`Response`; a handler may also take over the raw socket (fault injection: connection resets).
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

LOOPBACK = "127.0.0.1"


@dataclass
class Request:
    """One parsed HTTP request, as a handler sees it."""

    method: str
    path: str  # percent-decoded path without the query
    raw_path: str  # the request target as sent
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    base_url: str  # scheme://host:port of this server, no trailing slash
    handler: BaseHTTPRequestHandler

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Response:
    """What a handler answers. `body` may be bytes or an iterator of byte chunks (streamed)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""
    # Set by a fault: close the socket after sending this many body bytes (connection reset).
    reset_after: int | None = None
    # Length of a streamed (iterator) body, sent as Content-Length instead of chunked encoding,
    # so clients can see a file's size and detect a short read.
    length: int | None = None


def json_response(
    status: int,
    payload: Any,
    content_type: str = "application/json; charset=utf-8",
    headers: dict[str, str] | None = None,
) -> Response:
    hdrs = {"Content-Type": content_type}
    if headers:
        hdrs.update(headers)
    return Response(status=status, headers=hdrs, body=orjson.dumps(payload))


Handler = Callable[[Request], Response]


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real servers
    # Small responses (searches, token answers) otherwise wait ~40 ms on Nagle + delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        return  # quiet: tests and the demo read their own logs

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        port = self.server.server_address[1]
        req = Request(
            method=self.command,
            path=unquote(split.path),
            raw_path=self.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            base_url=f"http://{LOOPBACK}:{port}",
            handler=self,
        )
        try:
            resp = self.server.app(req)
        except Exception as exc:  # a sandbox bug must show up as a 500, not a hung client
            resp = json_response(
                500,
                {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "error", "code": "exception", "diagnostics": f"sandbox error: {exc!r}"}
                    ],
                },
            )
        self._send(resp)

    def _send(self, resp: Response) -> None:
        chunks: Iterator[bytes]
        if isinstance(resp.body, bytes | bytearray):
            data = bytes(resp.body)
            chunks = iter([data]) if data else iter([])
            length: int | None = len(data)
        else:
            chunks = iter(resp.body)
            length = resp.length
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        for chunk in chunks:
            if resp.reset_after is not None and sent + len(chunk) > resp.reset_after:
                part = chunk[: max(0, resp.reset_after - sent)]
                self._write_chunk(part, length is None)
                self.wfile.flush()
                self._reset()
                return
            self._write_chunk(chunk, length is None)
            sent += len(chunk)
        if length is None:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes, chunked: bool) -> None:
        if not data:
            return
        if chunked:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        else:
            self.wfile.write(data)

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees a connection reset mid-body.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, port: int, app: Handler) -> None:
        self.app = app
        super().__init__((LOOPBACK, port), _RequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a killed run, a reset test) is normal, not a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """Serves `app` on 127.0.0.1 (never another interface) in a background thread."""

    def __init__(self, app: Handler, port: int = 0) -> None:
        self._server = _Server(port, app)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="sandbox", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
