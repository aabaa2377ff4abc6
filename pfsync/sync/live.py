"""The real engines behind `pfsync sync`: HTTP clients, source and Medplum auth, export, loader, state store.

pfsync.sync.run orchestrates against the small `Engines` protocol (pfsync.sync.engines); this module wires the real pieces
(pfsync.source.export.run_export, pfsync.load.loader.Loader, pfsync.source.auth, pfsync.medplum.auth) for one source.
Each source gets its own clients and token (its own audience: docs/practice-fusion.md "Servers").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pfsync.core.errors import AuthError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.ndjson import Record, iter_file
from pfsync.core.settings import Settings, SourceSettings
from pfsync.load.loader import Loader
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, RetryPolicy, SystemClock, json_object, make_client, request_with_retry
from pfsync.net.tokens import BearerAuth
from pfsync.source.auth import source_auth
from pfsync.source.bulk import ExportRequest
from pfsync.source.export import run_export
from pfsync.source.exportjob import LandedFile
from pfsync.sync.engines import SyncLoader
from pfsync.sync.state import LocalStateStore, StateStore
from pfsync.sync.state_medplum import MedplumStateStore, find_seed_checkpoint


def open_store(settings: Settings, *, clock: Clock | None = None) -> tuple[StateStore, Callable[[], None]]:
    """The configured state backend and a function that closes what it opened."""
    if settings.state_backend == "local":
        return LocalStateStore(settings.state_dir), lambda: None
    # The Medplum client owns the auth: the process's shared token (pfsync.medplum.auth); connect
    # closes the httpx client itself when it fails.
    medplum = MedplumClient.connect(
        settings.medplum, make_client(settings.http), settings=settings.http, clock=clock
    )
    return MedplumStateStore(medplum), medplum.close


class LiveEngines:
    """Engines for one source over real HTTP. What the constructor opened is closed by `close`, or
    by the constructor itself when a later step raises (a refused source secret, a missing one)."""

    def __init__(
        self,
        settings: Settings,
        source: SourceSettings,
        stop: threading.Event,
        *,
        clock: Clock | None = None,
        events: EventSink | None = None,
        dry_run: bool = False,
    ) -> None:
        self.settings, self.source, self.stop = settings, source, stop
        self.clock = clock or SystemClock()
        self.events = events or NullSink()
        self.dry_run = dry_run
        self.policy = RetryPolicy.from_settings(settings.http)
        with contextlib.ExitStack() as opened:
            self.source_client = opened.enter_context(make_client(settings.http))
            self.authenticator, self.source_auth = source_auth(source, self.source_client, http=settings.http,
                                                               clock=self.clock,
                                                               negotiate=not settings.export.strict_scopes)  # fmt: skip
            # The loader fetches missing references and attachments from the source with this client;
            # a separate one so the authenticator's own token requests never pass through BearerAuth.
            self.source_fetch_client = opened.enter_context(make_client(settings.http, auth=self.source_auth))
            # This source's one Medplum client; its token is the process's one, shared by every source.
            self.medplum = opened.enter_context(MedplumClient.connect(
                settings.medplum, make_client(settings.http, timeout=settings.http.load_timeout),
                settings=settings.http, clock=clock, stop=stop,
            ))  # fmt: skip
            self._opened = opened.pop_all()
        self._granted: list[str] | None = None

    def prove_credentials(self) -> None:
        """One token request to the source and one to Medplum on every run, even when nothing
        changed: a wrong or revoked secret must fail the run (exit 4, status unhealthy), not hide
        until there is something to load. The tokens are the ones the run then uses. With
        medplum.auth = basic there is no token: one `_summary=count` search proves the secret."""
        self._granted_types()
        auth = self.medplum.auth
        if isinstance(auth, BearerAuth):
            auth.provider.prove()
            return
        resp = self.medplum.send("GET", "Patient", cost="search", params={"_summary": "count"})
        if resp.status_code in (401, 403):
            raise AuthError(
                f"Medplum refused the client credentials (HTTP {resp.status_code})",
                hint="check MEDPLUM_CLIENT_ID / MEDPLUM_CLIENT_SECRET (`pfsync auth test` shows more)",
            )

    def _granted_types(self) -> list[str]:
        if self._granted is None:
            self.authenticator.token()
            self._granted = list(self.authenticator.granted_types(self.source.resource_types)[0])
        return self._granted

    def run_export(
        self, request: ExportRequest, out_dir: Path, on_file: Callable[[LandedFile], None]
    ) -> str | None:
        result = run_export(self.source, self.settings.export, self.source_client, self.source_auth,
                            out_dir=out_dir, request=request, clock=self.clock, events=self.events,
                            on_file=on_file, stop=self.stop, granted_types=self._granted_types(),
                            policy=self.policy, unsupported_types=self.authenticator.unsupported_types)  # fmt: skip
        return result.transaction_time

    @contextlib.contextmanager
    def _loader(self) -> Iterator[SyncLoader]:
        with Loader(self.source, self.settings.load, self.medplum, state_dir=self.settings.state_dir,
                    source_client=self.source_fetch_client, http=self.settings.http, clock=self.clock,
                    events=self.events, dry_run=self.dry_run, stop=self.stop) as loader:  # fmt: skip
            yield loader

    def loader(self) -> AbstractContextManager[SyncLoader]:
        return self._loader()

    def group_members(self, group_id: str, scratch: Path) -> frozenset[str]:
        """Patient ids in the group: `Group/{id}` members if the server lists them, else the ids of a
        `_type=Patient` export of the group without `_since` (Practice Fusion's Group reads carry a
        `quantity` but no `member`: docs/bulk-data.md, recorded case 23)."""
        url = f"{self.source.base_url}/Group/{group_id}"
        resp = request_with_retry(
            lambda: self.source_client.get(url, auth=self.source_auth, headers={"Accept": "application/fhir+json"}),
            method="GET", url=url, policy=self.policy, clock=self.clock,
        )  # fmt: skip
        if resp.status_code == 200:
            body: Any = json_object(resp, f"reading Group/{group_id}")
            members = body.get("member") if isinstance(body, dict) else None
            if isinstance(members, list) and members:
                return frozenset(
                    str(m["entity"]["reference"]).rsplit("/", 1)[-1]
                    for m in members
                    if isinstance(m, dict)
                    and isinstance(m.get("entity"), dict)
                    and m["entity"].get("reference")
                )
        ids: set[str] = set()

        def collect(landed: LandedFile) -> None:
            if landed.kind == "output" and landed.type == "Patient":
                for item in iter_file(landed.path):
                    if isinstance(item, Record) and item.resource.get("resourceType") == "Patient":
                        ids.add(str(item.resource.get("id")))

        request = ExportRequest(level="group", group_id=group_id, types=("Patient",),
                                method=self.settings.export.kickoff_method)  # fmt: skip
        self.run_export(request, scratch, collect)
        return frozenset(ids)

    def seed_checkpoint(self) -> str | None:
        return find_seed_checkpoint(self.medplum)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._opened.close()


def live_engines(settings: Settings, *, clock: Clock | None = None, events: EventSink | None = None,
                 dry_run: bool = False) -> Callable[[SourceSettings, threading.Event], LiveEngines]:  # fmt: skip
    def make(source: SourceSettings, stop: threading.Event) -> LiveEngines:
        return LiveEngines(settings, source, stop, clock=clock, events=events, dry_run=dry_run)

    return make


__all__ = ["LiveEngines", "live_engines", "open_store"]
