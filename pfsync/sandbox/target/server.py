"""The target sandbox: a local server that behaves like a real Medplum 5.0.x, for tests, benchmarks and
the demo (spec: docs/medplum.md and the recorded transcripts; the transcripts win).

    sandbox = TargetSandbox(state_dir=tmp, quota=None).start()
    sandbox.fhir_url          # http://127.0.0.1:PORT/fhir/R4/
    sandbox.faults.throttle_next(3)
    sandbox.stop()

Control routes (no auth) for tests that run pfsync as a subprocess:
    GET  /_sandbox/stats                      counters (see Stats)
    POST /_sandbox/reset                      wipe data and faults
    POST /_sandbox/clients                    {"client_id", "secret", "quota"?, "quota_window"?}
    POST /_sandbox/faults/throttle            {"n": 1}   outer 429 throttled
    POST /_sandbox/faults/error               {"n": 1, "status": 500|503}
    POST /_sandbox/faults/reset-connection    {"n": 1}   TCP reset
    POST /_sandbox/faults/too-large           {"n": 1}   400 "File too large"
    POST /_sandbox/faults/conflicts           {"rate": 0.25, "only_concurrent": false, "seed": 0}
    POST /_sandbox/faults/expire-tokens       every issued token now gets 401
    POST /_sandbox/faults/clear
    POST /_sandbox/auth-limit                 {"limit": 160|null, "seconds": 60} token requests per window
                                              (default: Medplum's 160 a minute, enforced; reset starts a new window)
    GET  /_sandbox/faults                     what is armed
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import orjson

from pfsync.sandbox.httpbase import LoopbackServer, Request, Response, json_response
from pfsync.sandbox.target.asyncjobs import AsyncJobs
from pfsync.sandbox.target.auth import Auth, Client
from pfsync.sandbox.target.batch import BatchProcessor
from pfsync.sandbox.target.common import Json
from pfsync.sandbox.target.faults import Faults
from pfsync.sandbox.target.ops import Engine
from pfsync.sandbox.target.quota import Quota
from pfsync.sandbox.target.routes import TargetApp
from pfsync.sandbox.target.stats import Stats
from pfsync.sandbox.target.store import Store

__all__ = ["TargetSandbox"]

DB_NAME = "medplum-sandbox.sqlite3"


class TargetSandbox:
    """A Medplum-like FHIR server on 127.0.0.1 (see module docstring)."""

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        port: int = 0,
        client_id: str = "pfsync-target",
        client_secret: str = "target-secret",
        quota: int | None = None,
        quota_window: float = 60.0,
        token_lifetime: int = 3600,
        check_references_on_write: bool = False,
        conflict_rate: float = 0.0,
        max_json_size: int = 1_048_576,
    ) -> None:
        self.state_dir = state_dir
        self.port = port
        self.client_id = client_id
        self.client_secret = client_secret
        self.stats = Stats()
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(state_dir / DB_NAME if state_dir is not None else None)
        key = self.store.get_setting("token_key")
        if key is None:
            key = secrets.token_urlsafe(32)
            self.store.set_setting("token_key", key)
        self.auth = Auth(key, token_lifetime)
        self.faults = Faults(conflict_rate, on_expire_tokens=self.auth.expire_all)
        self.engine = Engine(self.store, self.stats, check_references=check_references_on_write)
        self.batches = BatchProcessor(self.engine, self.faults)
        self.jobs = AsyncJobs(self.engine, self.batches)
        self.app = TargetApp(
            auth=self.auth,
            engine=self.engine,
            batches=self.batches,
            jobs=self.jobs,
            faults=self.faults,
            stats=self.stats,
            max_json_size=max_json_size,
            control=self._control,
        )
        self.add_client(client_id, client_secret, quota=quota, quota_window=quota_window)
        self._server: LoopbackServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> TargetSandbox:
        self._server = LoopbackServer(self.app, self.port).start()
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.jobs.wait_idle(5.0)
        self.store.close()

    def __enter__(self) -> TargetSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def fhir_url(self) -> str:
        return self.base_url + "fhir/R4/"

    # ------------------------------------------------------------------ configuration
    def add_client(
        self, client_id: str, secret: str, *, quota: int | None = None, quota_window: float = 60.0
    ) -> None:
        """A client_credentials client of its own project; `quota` points per `quota_window` seconds
        (None: quota off, the header still counts down from 50,000)."""
        self.auth.add(
            Client(
                client_id,
                secret,
                Quota(quota, quota_window),
                name=client_id,
                token_lifetime=self.auth.token_lifetime,
            )
        )

    @property
    def max_json_size(self) -> int:
        return self.app.max_json_size

    @max_json_size.setter
    def max_json_size(self, value: int) -> None:
        self.app.max_json_size = value

    @property
    def max_batch_size(self) -> int:
        """Largest async (`Prefer: respond-async`) batch body in bytes (docs/medplum.md: default 50 MB)."""
        return self.app.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.app.max_batch_size = value

    @property
    def check_references_on_write(self) -> bool:
        return self.engine.check_references

    @check_references_on_write.setter
    def check_references_on_write(self, value: bool) -> None:
        self.engine.check_references = value

    def set_auth_limit(self, limit: int | None, seconds: float = 60.0) -> None:
        """Token requests allowed per window on /oauth2/* (default: Medplum's 160 a minute; None: no limit)."""
        self.app.limits.set_auth_limit(limit, seconds)

    # ------------------------------------------------------------------ inspection
    def reset(self) -> None:
        """Wipe data, faults, counters and quota windows (clients stay)."""
        self.jobs.wait_idle(5.0)
        self.store.wipe()
        self.faults.clear()
        self.stats.reset()
        self.app.limits.reset()
        self.auth.not_before = 0.0
        for client in self.auth.clients.values():
            client.quota = Quota(
                client.quota.window.limit if client.quota.enforce else None, client.quota.window.seconds
            )

    def resources(self, rtype: str) -> list[Json]:
        return self.store.resources(rtype)

    def count(self, rtype: str | None = None) -> int:
        return self.store.count(rtype)

    def find_by_identifier(self, rtype: str, system: str, value: str) -> list[Json]:
        return self.store.read_many(rtype, self.store.ids_by_identifier(rtype, [(system, value)]))

    # ------------------------------------------------------------------ control routes
    def _control(self, req: Request, parts: list[str]) -> Response:
        body: Any = {}
        if req.body:
            try:
                body = orjson.loads(req.body)
            except orjson.JSONDecodeError:
                return json_response(400, {"error": "body must be JSON"})
        if not isinstance(body, dict):
            return json_response(400, {"error": "body must be a JSON object"})
        n = int(body.get("n", 1))
        route = (req.method, *parts)
        f = self.faults
        actions: dict[tuple[str, ...], Any] = {
            ("POST", "reset"): self.reset,
            ("POST", "faults", "throttle"): lambda: f.throttle_next(n),
            ("POST", "faults", "error"): lambda: f.error_next(n, int(body.get("status", 500))),
            ("POST", "faults", "reset-connection"): lambda: f.reset_next(n),
            ("POST", "faults", "too-large"): lambda: f.too_large_next(n),
            ("POST", "faults", "conflicts"): lambda: f.set_conflicts(
                float(body.get("rate", 0.0)),
                only_concurrent=bool(body.get("only_concurrent", False)),
                seed=body.get("seed"),
            ),
            ("POST", "faults", "expire-tokens"): f.expire_tokens,
            ("POST", "faults", "clear"): f.clear,
            ("POST", "auth-limit"): lambda: self.set_auth_limit(
                None if body.get("limit") is None else int(body["limit"]), float(body.get("seconds", 60.0))
            ),
            ("POST", "clients"): lambda: self.add_client(
                str(body["client_id"]),
                str(body["secret"]),
                quota=body.get("quota"),
                quota_window=float(body.get("quota_window", 60.0)),
            ),
        }
        if route == ("GET", "stats"):
            return json_response(200, {**self.stats.as_dict(), "count": self.count()})
        if route == ("GET", "faults"):
            return json_response(200, f.pending())
        action = actions.get(route)
        if action is None:
            return json_response(404, {"error": f"no control route {req.method} /_sandbox/{'/'.join(parts)}"})
        try:
            action()
        except (KeyError, ValueError, TypeError) as err:
            return json_response(400, {"error": str(err)})
        return json_response(200, {"ok": True, "faults": f.pending()})
