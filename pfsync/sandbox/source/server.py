"""A local server that behaves like Practice Fusion's FHIR Bulk Data API (the source sandbox).

One `SourceSandbox` hosts one or more practices, each at `{server}/fhir/r4/v1/{practice-guid}` with its
own dataset, token endpoint and groups (docs/practice-fusion.md "Servers"). Resources live in SQLite; export
jobs write NDJSON to a temp dir and files are streamed from disk. Tests drive it through Python methods
or, from another process, through the control API under `{server}/_sandbox/`:

    GET    /_sandbox/config                      practices, base and token URLs, foreign storage URL
    POST   /_sandbox/config                      {"token_lifetime", "system_export", "resources_per_file",
                                                 "max_assertion_lifetime", "track_jti", "smart_v2", "job_ttl",
                                                 "rate_limit", "rate_block", "unknown_group", "scope_types"}
    POST   /_sandbox/reset                       data, faults, jobs, tokens and counters back to the start
    GET    /_sandbox/faults | DELETE             armed faults | disarm all
    POST   /_sandbox/faults                      {"name": "rate_limit", "times": 2, "where": "status", ...}
    GET    /_sandbox/stats  | DELETE             request counters and the recent request log | clear
    POST   /_sandbox/resources?practice=P        upsert the JSON resource body (bumps meta.lastUpdated)
    DELETE /_sandbox/resources/{type}/{id}?practice=P
    POST   /_sandbox/groups/{id}/members?practice=P   {"patients": ["id", ...]}
    POST   /_sandbox/clients                     {"client_id", "secret", "jwks", "allowed_scopes", "practice"}
    POST   /_sandbox/revoke-tokens
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from pfsync.sandbox.httpbase import LoopbackServer, Request, Response, json_response
from pfsync.sandbox.source import datagen
from pfsync.sandbox.source.auth import PF_SCOPE_TYPES, Auth, AuthConfig, Client
from pfsync.sandbox.source.export import Jobs
from pfsync.sandbox.source.faults import Faults, RateLimiter, Seen, Stats
from pfsync.sandbox.source.fhir import EXTRA_TYPES, State, handle, outcome, record, serve_file
from pfsync.sandbox.source.store import Clock, Store

DEFAULT_PRACTICE = "5f6c7a10-0b1e-4c2d-9a3e-5e7a1c0d2b40"
GROUP_MAX = 1_000  # docs/practice-fusion.md: groups hold at most 1,000 patients
SAMPLE_PATIENTS = 30


class SourceSandbox:
    """Practice Fusion-like Bulk Data server on 127.0.0.1. See the module docstring for the control API.

    `data_dir`: NDJSON (plain or .gz) for the first practice (a sub-directory named after a practice guid
    feeds that practice); practices without data get seeded generated sample data (`datagen`).
    `jwks`/`client_secret`/`allowed_scopes` register `client_id` with every practice.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        state_dir: Path | None = None,
        port: int = 0,
        practices: list[str] | None = None,
        token_lifetime: int = 300,
        system_export: bool = False,
        resources_per_file: int = 10_000,
        jwks: dict[str, Any] | None = None,
        client_id: str = "pfsync-sandbox",
        client_secret: str | None = "sandbox-secret",
        allowed_scopes: list[str] | None = None,
        smart_v2: bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.practices = list(practices or [DEFAULT_PRACTICE])
        self.client_id = client_id
        self._port = port
        self._own_state = state_dir is None
        self._state_dir = state_dir
        self._defaults = (AuthConfig(token_lifetime=token_lifetime, smart_v2=smart_v2), system_export,
                          resources_per_file)  # fmt: skip
        self._default_client = Client(client_id, client_secret, jwks, allowed_scopes)
        self.faults = Faults()
        self.stats = Stats()
        self._server: LoopbackServer | None = None
        self._foreign: LoopbackServer | None = None
        self._state: State | None = None
        self._extra_clients: list[tuple[str, Client]] = []
        self._known_types: set[str] = set()

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> SourceSandbox:
        root = Path(tempfile.mkdtemp(prefix="pfsync-source-")) if self._state_dir is None else self._state_dir
        root.mkdir(parents=True, exist_ok=True)
        self._state_dir = root
        store = Store(root / "source.sqlite3", Clock())
        config = replace(self._defaults[0])
        known = set(PF_SCOPE_TYPES) | set(EXTRA_TYPES)
        self._state = State(store, Auth(config, known), Jobs(root / "jobs"), self.faults, self.stats, known,
                            system_export=self._defaults[1], resources_per_file=self._defaults[2],
                            practices=self.practices)  # fmt: skip
        self._server = LoopbackServer(self._app, self._port).start()
        self._foreign = LoopbackServer(self._foreign_app).start()
        self._state.server_url = self._server.base_url
        self._state.foreign_url = f"{self._foreign.base_url}/storage"
        self._load()
        self._known_types = set(self._state.auth.known_types)
        self._register_defaults()
        return self

    def stop(self) -> None:
        for server in (self._server, self._foreign):
            if server is not None:
                server.stop()
        self._server = self._foreign = None
        if self._state is not None:
            self._state.jobs.clear()
        if self._own_state and self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)

    def __enter__(self) -> SourceSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _load(self) -> None:
        state = self.state
        for index, practice in enumerate(self.practices):
            base = self.base_url(practice)
            source = None
            if self.data_dir is not None and (self.data_dir / practice).is_dir():
                source = self.data_dir / practice
            elif self.data_dir is not None and index == 0:
                source = self.data_dir
            if source is not None and (source / "attachments").is_dir():
                state.attachments_dir = source / "attachments"
            if state.store.types(practice):
                # A restart on a kept state dir serves what the store holds, changes and deletions
                # included; reloading the data dir would revert them (chaos tests restart us).
                pass
            elif source is not None:
                state.store.load_dir(practice, source, base)
            else:
                state.store.load_lines(practice, datagen.iter_lines(SAMPLE_PATIENTS, seed=1000 + index), base)
            self._default_groups(practice)
        state.known_types |= {t for p in self.practices for t in state.store.types(p)}

    def _default_groups(self, practice: str) -> None:
        """Datasets without Groups get PF-like ones: a 9-patient testing group and <=1,000-patient chunks."""
        store = self.state.store
        if store.groups(practice):
            return
        patients = store.patient_ids(practice)
        # docs/practice-fusion.md: the PF sandbox has a "Bulk Data Testing Group" of 9 patients
        store.create_group(practice, "bulk-data-testing-group", "Bulk Data Testing Group", patients[:9])
        for n, start in enumerate(range(0, max(len(patients), 1), GROUP_MAX), 1):
            store.create_group(practice, f"practice-patients-{n}", f"Practice patients {n}",
                               patients[start : start + GROUP_MAX])  # fmt: skip

    def _register_defaults(self) -> None:
        for practice in self.practices:
            self.state.auth.register(practice, replace(self._default_client))
        for practice, client in self._extra_clients:
            self.state.auth.register(practice, client)

    @property
    def state(self) -> State:
        if self._state is None:
            raise RuntimeError("SourceSandbox is not started")
        return self._state

    # ---- URLs ----------------------------------------------------------------------------------
    @property
    def server_url(self) -> str:
        return self.state.server_url

    @property
    def foreign_url(self) -> str:
        """Origin of the "foreign storage" server used by the `foreign_storage` fault."""
        return self.state.foreign_url.rsplit("/storage", 1)[0]

    def _practice(self, practice: str | None) -> str:
        chosen = practice or self.practices[0]
        if chosen not in self.practices:
            raise KeyError(f"unknown practice {chosen!r}")
        return chosen

    def base_url(self, practice: str | None = None) -> str:
        """FHIR base of a practice (default: the first)."""
        return self.state.base(self._practice(practice))

    def token_url(self, practice: str | None = None) -> str:
        return f"{self.base_url(practice)}/token"

    # ---- knobs and mutations -------------------------------------------------------------------
    @property
    def auth_config(self) -> AuthConfig:
        """Mutable: token_lifetime, max_assertion_lifetime, track_jti, smart_v2 (reset by `reset()`)."""
        return self.state.auth.config

    def configure(self, **knobs: Any) -> None:
        """Set knobs at runtime: those of `auth_config`, system_export, resources_per_file, job_ttl,
        rate_limit (requests a minute per rate-limited route, None: off) with rate_block (seconds of
        429 once past it; 300 like the reference server), unknown_group ("not-found" or "empty"),
        scope_types ("known" or "data")."""
        for name, value in knobs.items():
            if name == "rate_limit":
                block = float(knobs.get("rate_block", 300.0))
                self.state.limiter = None if value is None else RateLimiter(int(value), block)
            elif name == "rate_block":
                continue
            elif name == "scope_types":
                # "data": like the reference server, a scope for a type the data lacks is refused
                # (400 invalid_scope "Resources of type X do not exist on this server"); "known": any
                # type Practice Fusion has a scope for is accepted.
                if value not in ("known", "data"):
                    raise ValueError(f"scope_types must be 'known' or 'data', not {value!r}")
                held = {t for p in self.practices for t in self.state.store.types(p)} | {"Group"}
                self.state.auth.known_types = held if value == "data" else set(self._known_types)
            elif name == "unknown_group":
                if value not in ("not-found", "empty"):
                    raise ValueError(f"unknown_group must be 'not-found' or 'empty', not {value!r}")
                self.state.unknown_group = value
            elif hasattr(self.state.auth.config, name):
                setattr(self.state.auth.config, name, value)
            elif name in ("system_export", "resources_per_file"):
                setattr(self.state, name, value)
            elif name == "job_ttl":
                self.state.jobs.ttl = float(value)
            else:
                raise ValueError(f"unknown setting {name!r}")

    def register_client(self, client_id: str, *, secret: str | None = None, jwks: dict[str, Any] | None = None,
                        allowed_scopes: list[str] | None = None, practice: str | None = None) -> None:  # fmt: skip
        """Register (or replace) a client with a practice; it survives `reset()`."""
        entry = (self._practice(practice), Client(client_id, secret, jwks, allowed_scopes))
        self._extra_clients.append(entry)
        self.state.auth.register(*entry)

    def upsert(self, resource: dict[str, Any], practice: str | None = None) -> dict[str, Any]:
        """Create or replace a resource; bumps meta.lastUpdated (so `_since` sees it). Returns it as stored."""
        p = self._practice(practice)
        return self.state.store.upsert(p, resource, self.base_url(p))

    def delete(self, type: str, id: str, practice: str | None = None) -> bool:
        """Delete a resource; its deletion time feeds `deleted[]` of later `_since` exports."""
        return self.state.store.delete(self._practice(practice), type, id)

    def add_to_group(self, group_id: str, patient_ids: list[str], practice: str | None = None) -> None:
        p = self._practice(practice)
        if not self.state.store.has_group(p, group_id):
            self.state.store.create_group(p, group_id, group_id, [])
        self.state.store.add_members(p, group_id, patient_ids)

    def groups(self, practice: str | None = None) -> list[tuple[str, str, int]]:
        """(id, name, member count) of the practice's groups."""
        return self.state.store.groups(self._practice(practice))

    def export_ready_at(self, export_id: str, practice: str | None = None) -> float | None:
        """When (time.time()) the export's status first answers complete: its files written and any
        busy_export over. None while it is not, or for an unknown job. scripts/bench_export measures
        the polling lag from it."""
        job = self.state.jobs.get(export_id, self._practice(practice))
        if job is None or job.finished_at is None:
            return None
        busy = 0.0 if job.busy_until is None else job.busy_until - job.created_at  # on the sandbox clock
        return max(job.finished_at, job.created + busy)

    def use_clock(self, now: Callable[[], float]) -> None:
        """Time of busy_export and the rate limiter (default time.time; `reset()` restores it)."""
        self.state.now = now

    def revoke_tokens(self) -> None:
        self.state.auth.revoke_all()

    def reset(self) -> None:
        """Data, faults, jobs, tokens, settings and counters back to how `start()` left them."""
        state = self.state
        state.store.reset()
        self.faults.clear()
        state.jobs.clear()
        state.auth.tokens.clear()
        state.auth.jtis.clear()
        state.auth.config = replace(self._defaults[0])
        state.system_export, state.resources_per_file = self._defaults[1], self._defaults[2]
        state.jobs.ttl = 3600
        state.now, state.limiter, state.unknown_group = time.time, None, "not-found"
        state.auth.known_types = set(self._known_types)
        self._extra_clients.clear()
        state.auth.clients.clear()
        self._register_defaults()
        self.stats.clear()

    # ---- HTTP ----------------------------------------------------------------------------------
    def _app(self, req: Request) -> Response:
        state = self.state
        if req.path.startswith("/_sandbox/"):
            resp = self._control(req, req.path[len("/_sandbox/") :].rstrip("/"))
            return resp
        prefix = "/fhir/r4/v1/"
        if req.path.startswith(prefix):
            practice, _, rest = req.path[len(prefix) :].partition("/")
            if practice in self.practices:
                kind, resp = handle(state, req, practice, "/" + rest if rest else "")
                record(state, req, kind, resp)
                return resp
        resp = outcome(404, f"Unknown practice or route {req.path}", "not-found")
        record(state, req, "unknown", resp)
        return resp

    def _foreign_app(self, req: Request) -> Response:
        """ "Foreign storage": serves job files by URL alone, recording whether a token leaked to it."""
        parts = req.path.strip("/").split("/")
        job = None
        if len(parts) == 4 and parts[0] == "storage":
            job = next((j for p in self.practices if (j := self.state.jobs.get(parts[1], p))), None)
        resp = (
            serve_file(self.state, req, job, *parts[2:4]) if job else outcome(404, "Not found", "not-found")
        )
        self.stats.record(Seen("foreign", req.method, req.base_url + req.raw_path, resp.status,
                               bool(req.header("authorization"))))  # fmt: skip
        return resp

    def _control(self, req: Request, route: str) -> Response:
        body: Any = orjson.loads(req.body) if req.body else {}
        practice = req.param("practice")
        ok = json_response(200, {"ok": True})
        try:
            if route == "config" and req.method == "GET":
                return json_response(200, {
                    "practices": self.practices, "server_url": self.server_url,
                    "bases": {p: self.base_url(p) for p in self.practices},
                    "token_urls": {p: self.token_url(p) for p in self.practices},
                    "foreign_url": self.foreign_url, "client_id": self.client_id})  # fmt: skip
            if route == "config" and req.method == "POST":
                self.configure(**body)
                return ok
            if route == "reset" and req.method == "POST":
                self.reset()
                return ok
            if route == "faults":
                if req.method == "POST":
                    params = dict(body)
                    self.faults.arm(params.pop("name"), params.pop("times", 1), **params)
                elif req.method == "DELETE":
                    self.faults.clear()
                return json_response(200, self.faults.active())
            if route == "stats":
                if req.method == "DELETE":
                    self.stats.clear()
                return json_response(200, self.stats.as_dict())
            if route == "resources" and req.method == "POST":
                return json_response(200, self.upsert(body, practice))
            if route.startswith("resources/") and req.method == "DELETE":
                _, rtype, rid = route.split("/", 2)
                return json_response(200, {"deleted": self.delete(rtype, rid, practice)})
            if route.startswith("groups/") and route.endswith("/members") and req.method == "POST":
                self.add_to_group(route.split("/")[1], list(body["patients"]), practice)
                return ok
            if route == "clients" and req.method == "POST":
                cid = body.pop("client_id")
                self.register_client(cid, **body)
                return ok
            if route == "revoke-tokens" and req.method == "POST":
                self.revoke_tokens()
                return ok
        except (KeyError, ValueError, TypeError) as exc:
            return outcome(400, f"Bad control request: {exc!r}", "invalid")
        return outcome(404, f"Unknown control route {route}", "not-found")
