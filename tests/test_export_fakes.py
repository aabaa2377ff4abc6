"""Small fakes shared by the export tests (no tests here): a fake clock and a sandbox token auth."""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any

import httpx


class FakeClock:
    """Time that only moves when someone sleeps: retry and poll waits cost nothing."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.t += max(0.0, seconds)

    @property
    def slept(self) -> float:
        return sum(self.sleeps)


class SandboxAuth(httpx.Auth):
    """Bearer tokens from the source sandbox (client_secret_basic), renewed once on a 401.

    A stand-in for pfsync.net.tokens.BearerAuth in tests of the export alone: it adds the token to every
    request it is given, so the tests prove that the export itself withholds it from foreign origins.
    """

    def __init__(self, token_url: str, scope: str = "system/*.read") -> None:
        self.token_url = token_url
        self.scope = scope
        self.token: str | None = None
        self.fetched = 0
        self._lock = threading.Lock()

    def _fetch(self) -> str:
        resp = httpx.post(self.token_url, data={"grant_type": "client_credentials", "scope": self.scope},
                          auth=("pfsync-sandbox", "sandbox-secret"))  # fmt: skip
        resp.raise_for_status()
        self.fetched += 1
        return str(resp.json()["access_token"])

    def current(self, *, force: bool = False) -> str:
        with self._lock:
            if self.token is None or force:
                self.token = self._fetch()
            return self.token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.current()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self.current(force=True)}"
            yield request


def lines_of(data: bytes) -> list[Any]:
    import orjson

    return [orjson.loads(line) for line in data.splitlines() if line.strip()]
