"""A small threaded hostile server on 127.0.0.1 for tests/test_hostile_*.py, and a pfsync runner.

`Hostile` answers each path from a table of handlers and records every request it receives, so a
test can play a source or Medplum that misbehaves in one precise way, and a second `Hostile` can
stand in for a foreign origin (a test asserts it received nothing). `bulk_source` scripts the
minimum of a SMART Backend Services + Bulk Data server (docs/bulk-data.md: discovery, token, kick-off,
status, files) whose every answer a test may replace. `run_pfsync` runs the real CLI in a child
process and reports its exit code, output and peak RSS (the child's own high-water mark).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""
    pause: float = 0.0  # between the pieces of an iterable body (a trickle)

    @classmethod
    def json(cls, value: Any, status: int = 200, **headers: str) -> Answer:
        return cls(status, {"Content-Type": "application/json", **headers}, orjson.dumps(value))

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Answer:
        return cls(status, {"Location": location})


Handler = Callable[[Seen], Answer]


class Hostile:
    """Answers `routes[path]` (the path without its query); 404 for anything else. Thread-safe."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closed = False
        owner = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                seen = Seen(
                    self.command,
                    parts.path,
                    parts.query,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with owner._lock:
                    owner.seen.append(seen)
                handler = owner.routes.get(parts.path)
                answer = handler(seen) if handler else Answer(404, {}, b"not found")
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client hung up
                    self._answer(answer)

            def _answer(self, answer: Answer) -> None:
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                if isinstance(answer.body, bytes):
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                    return
                self.send_header("Connection", "close")  # the body ends when the connection does
                self.end_headers()
                self.close_connection = True
                for piece in answer.body:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    if answer.pause:
                        time.sleep(answer.pause)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def requests(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if path is None or s.path == path]

    def close(self) -> None:
        """Stops the server; closing again does nothing (a test and its fixture may both close it)."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()


TOKEN = "hostile-access-token-0123456789"


def bulk_source(server: Hostile, files: dict[str, Answer], *, rtype: str = "Patient") -> None:
    """Script `server` as a Bulk Data source under /fhir whose manifest lists `files` (name ->
    answer, served under /files/). Tests replace any route afterwards."""
    base = server.url
    server.routes["/fhir/.well-known/smart-configuration"] = lambda _: Answer.json({
        "token_endpoint": f"{base}/token", "capabilities": ["client-confidential-symmetric"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
    })  # fmt: skip
    server.routes["/token"] = lambda _: Answer.json(
        {"access_token": TOKEN, "token_type": "bearer", "expires_in": 300, "scope": f"system/{rtype}.read"}
    )
    server.routes[f"/fhir/{rtype}/$export"] = lambda _: Answer(202, {"Content-Location": f"{base}/status/1"})
    server.routes["/status/1"] = lambda seen: (
        Answer(202)
        if seen.method == "DELETE"
        else Answer.json(manifest(base, [(rtype, f"{base}/files/{name}") for name in files]))
    )
    for name, answer in files.items():
        server.routes[f"/files/{name}"] = lambda _, a=answer: a  # type: ignore[misc]


def manifest(base: str, outputs: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    return {
        "transactionTime": "2026-01-01T00:00:00Z",
        "request": f"{base}/fhir/Patient/$export",
        "requiresAccessToken": True,
        "output": [{"type": t, "url": u} for t, u in outputs],
        "error": [],
        **extra,
    }


def source_env(server: Hostile, tmp: Path, **extra: str) -> dict[str, str]:
    """pfsync's environment for `server` as its only source (client_secret_basic), state in `tmp`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "MEDPLUM_", "PFSYNC_"))}
    return {
        **clean,
        "PF_FHIR_BASE_URL": f"{server.url}/fhir",
        "PF_CLIENT_ID": "hostile-client",
        "PF_CLIENT_SECRET": "hostile-client-secret-value",
        "PF_RESOURCE_TYPES": "Patient",
        "PFSYNC_STATE_DIR": str(tmp / "state"),
        "PFSYNC_RETRY_MAX_WAIT": "0.2",
        "PFSYNC_POLL_MAX_WAIT": "0.2",
        "PFSYNC_HTTP_RETRIES": "1",
        "PFSYNC_LOG_FORMAT": "json",
        "NO_COLOR": "1",
        **extra,
    }


# The child reports its own peak RSS (VmHWM of its own address space) as it exits. ru_maxrss from
# wait4 would not do: Linux carries the pre-exec high-water mark over exec, so a child forked from
# a large pytest process would report the parent's size.
_WRAPPER = """
import atexit, runpy, sys
out = sys.argv[1]
def report():
    with open("/proc/self/status") as status:
        hwm = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(out, "w") as fh:
        fh.write(hwm)
atexit.register(report)
sys.argv = ["pfsync", *sys.argv[2:]]
runpy.run_module("pfsync", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    max_rss_mib: float  # the child's peak resident set (its VmHWM)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_pfsync(env: dict[str, str], *args: str, timeout: float = 60) -> Run:
    """`python -m pfsync ARGS` in a child; the test fails if it has not ended after `timeout` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "vmhwm"
        try:
            done = subprocess.run([sys.executable, "-c", _WRAPPER, str(hwm), *args], env=env, cwd=REPO,
                                  capture_output=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pfsync {' '.join(args)} did not end within {timeout} s") from None
        peak_kib = int(hwm.read_text()) if hwm.is_file() else 0
    return Run(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"),
               peak_kib / 1024)  # fmt: skip
