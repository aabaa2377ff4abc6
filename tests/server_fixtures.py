"""The two test tiers: every test that starts a server on 127.0.0.1 is an integration test.

- `starts_servers`: the decorator every fixture that starts a server carries (under `@pytest.fixture`).
  A test whose fixture closure holds such a fixture gets the `integration` marker at collection, so
  `-m "not integration"` (the fast tier, `scripts/test --fast`) never starts one.
- The guard: a test without the marker that opens a listening TCP socket in the pytest process fails
  at once, naming this module. The rule holds by construction instead of by review.
- Factories for the servers tests start themselves, each stopped at teardown: `hostile()` (a
  `Hostile`), `source_factory(**kwargs)` (a `SourceSandbox`), `sandboxes_factory(**kwargs)` (both
  sandboxes, `start_sandboxes`), `rig_factory(root, data)` (a chaos `Rig`), `http_server(handler)` (a
  threaded `http.server`, optionally TLS), `sandbox_process(tmp_path, *args)` (`pfsync sandbox` as a
  child process, with the environment it wrote).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from chaos_helpers import Rig
from hostile_server import Hostile

from pfsync.sandbox.run import Sandboxes, start_sandboxes
from pfsync.sandbox.source.server import SourceSandbox

F = TypeVar("F", bound=Callable[..., Any])

# Names of the fixtures that start servers; filled by @starts_servers as fixture modules are imported.
SERVER_FIXTURES: set[str] = set()
INTERNET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def starts_servers(fixture: F) -> F:
    """Marks a fixture function as one that starts a server: the tests that use it are integration tests."""
    SERVER_FIXTURES.add(fixture.__name__)
    return fixture


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: runs real HTTP against servers on 127.0.0.1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        closure = set(getattr(item, "fixturenames", ()))
        if closure & SERVER_FIXTURES and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Outside the integration tier, listening on a TCP socket fails the test (setup, call and teardown)."""
    if item.get_closest_marker("integration") is not None:
        return (yield)
    original = socket.socket.listen

    def listen(sock: socket.socket, backlog: int = socket.SOMAXCONN, /) -> None:
        if sock.family in INTERNET_FAMILIES:
            pytest.fail(
                f"{item.nodeid} is not marked integration but opened a listening socket: start servers "
                "through a fixture decorated with @starts_servers (tests/server_fixtures.py)",
                pytrace=False,
            )
        original(sock, backlog)

    socket.socket.listen = listen  # type: ignore[method-assign,assignment]
    try:
        return (yield)
    finally:
        socket.socket.listen = original  # type: ignore[method-assign]


@pytest.fixture
@starts_servers
def hostile() -> Iterator[Callable[[], Hostile]]:
    started: list[Hostile] = []

    def make() -> Hostile:
        server = Hostile()
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
@starts_servers
def source_factory() -> Iterator[Callable[..., SourceSandbox]]:
    """`source_factory(**kwargs)`: a started SourceSandbox of its own (its keyword arguments)."""
    started: list[SourceSandbox] = []

    def make(**kwargs: Any) -> SourceSandbox:
        sandbox = SourceSandbox(**kwargs).start()
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
@starts_servers
def sandboxes_factory() -> Iterator[Callable[..., Sandboxes]]:
    """`sandboxes_factory(**kwargs)`: both sandboxes through `start_sandboxes(**kwargs)`."""
    started: list[Sandboxes] = []

    def make(**kwargs: Any) -> Sandboxes:
        boxes = start_sandboxes(**kwargs)
        started.append(boxes)
        return boxes

    yield make
    for boxes in started:
        boxes.stop()


@pytest.fixture
@starts_servers
def rig_factory() -> Iterator[Callable[[Path, Path], Rig]]:
    """`rig_factory(root, data)`: a chaos Rig (sandboxes that survive restarts), stopped at teardown."""
    started: list[Rig] = []

    def make(root: Path, data: Path) -> Rig:
        rig = Rig.start(root, data)
        started.append(rig)
        return rig

    yield make
    for rig in started:
        rig.stop()


@pytest.fixture
@starts_servers
def http_server() -> Iterator[Callable[..., ThreadingHTTPServer]]:
    """`http_server(handler, tls=None)`: a threaded HTTP server on 127.0.0.1 (TLS with an SSLContext)."""
    started: list[ThreadingHTTPServer] = []

    def make(handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        started.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    yield make
    for server in started:
        server.shutdown()
        server.server_close()


SandboxProcess = tuple["subprocess.Popen[str]", dict[str, str]]


@pytest.fixture
@starts_servers
def sandbox_process() -> Iterator[Callable[..., SandboxProcess]]:
    """`sandbox_process(tmp_path, *args)`: `pfsync sandbox` on free ports, once it has written its
    environment file; returns the process and that environment. Killed at teardown if still running."""
    started: list[subprocess.Popen[str]] = []

    def make(tmp_path: Path, *args: str) -> SandboxProcess:
        env_file = tmp_path / "env"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pfsync", "sandbox", "--source-port", "0", "--target-port", "0",
             "--state", str(tmp_path / "state"), "--env-file", str(env_file), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(proc)
        deadline = time.monotonic() + 60
        while not env_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sandbox did not start: {proc.communicate()}")
            time.sleep(0.1)
        env = {}
        for line in env_file.read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip("'")
        return proc, env

    yield make
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
