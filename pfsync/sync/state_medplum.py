"""The Medplum state backend: one `Basic` resource per source, so stateless pods share checkpoints.

docs/medplum.md "Where to keep a checkpoint in Medplum": `Parameters` has no identifier, `Basic` has.
The resource carries identifier `https://pfsync.dev/state|<source>` and the state document (the
same JSON as the local backend, pfsync.sync.state) as a JSON string in one extension. It is found by
identifier search, created by `POST Basic` with `If-None-Exist: identifier=...` (docs/medplum.md
"Ids and identity", conditional create: two pods starting at once get one record, the second is
answered 200 with the first one's), and every later write is `PUT Basic/<id>` with the id in the
body and `If-Match: W/"<versionId>"` (docs/medplum.md "Optimistic locking": only the quoted form is
honoured), so two pods can never overwrite each other's state unseen. The run lease lives in the
same document and is renewed on every save.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import orjson

from pfsync.core.errors import LockedError, ProtocolError, StateError
from pfsync.core.instants import iso, parse_iso
from pfsync.core.marks import identifier_query
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import json_object, outcome_text, raise_for_status
from pfsync.sync.holders import Holder, Lease
from pfsync.sync.lock import LEASE_TTL, LeaseLock, check_lease, lease_expired, new_lease
from pfsync.sync.state import SyncState

STATE_SYSTEM = "https://pfsync.dev/state"
STATE_EXTENSION = "https://pfsync.dev/StructureDefinition/sync-state"
FHIR_JSON = "application/fhir+json"


class MedplumStateStore:
    """StateStore over Medplum `Basic` resources, through the one Medplum client."""

    backend = "medplum"

    def __init__(
        self,
        client: MedplumClient,
        *,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self.medplum = client
        self.client = self.medplum.http
        self.fhir_url = self.medplum.fhir_url
        self.clock = self.medplum.clock
        self.policy = self.medplum.policy
        self.lease_ttl = lease_ttl
        self._ids: dict[str, tuple[str, str]] = {}  # source -> (Basic id, versionId)
        self._held: dict[str, LeaseLock] = {}

    # ---- HTTP ------------------------------------------------------------------------------------
    def _send(self, method: str, url: str, *, content: bytes | None = None,
              headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
        return self.medplum.send(method, url, cost="search" if method == "GET" else "write", content=content,
                                 headers=headers)  # fmt: skip

    def _resource(self, source: str, state: SyncState) -> dict[str, Any]:
        return {
            "resourceType": "Basic",
            "identifier": [{"system": STATE_SYSTEM, "value": source}],
            "code": {"coding": [{"system": STATE_SYSTEM, "code": "sync-state"}], "text": "pfsync sync state"},
            "extension": [{"url": STATE_EXTENSION, "valueString": orjson.dumps(state.to_json()).decode()}],
        }

    def _parse(self, source: str, res: dict[str, Any]) -> SyncState:
        where = f"Medplum Basic/{res.get('id')} (state of {source!r})"
        for ext in res.get("extension") or []:
            if isinstance(ext, dict) and ext.get("url") == STATE_EXTENSION:
                try:
                    doc = orjson.loads(str(ext.get("valueString", "")))
                except orjson.JSONDecodeError:
                    raise StateError(f"{where}: the state extension is not JSON") from None
                return SyncState.from_json(doc, where)
        raise StateError(f"{where}: no {STATE_EXTENSION} extension", hint="was it edited by hand?")

    def _remember(self, source: str, res: dict[str, Any], response: httpx.Response | None = None) -> None:
        vid = str((res.get("meta") or {}).get("versionId") or "")
        if not vid and response is not None:
            vid = response.headers.get("ETag", "").removeprefix("W/").strip('"')
        rid = res.get("id")
        if not isinstance(rid, str) or not rid:
            raise ProtocolError(f"Medplum answered the sync state of {source!r} without an id")
        self._ids[source] = (rid, vid)

    def _fetch(self, source: str) -> tuple[dict[str, Any] | None, SyncState]:
        url = f"{self.fhir_url}Basic?{identifier_query(STATE_SYSTEM, source)}"
        resp = self._send("GET", url)
        raise_for_status(resp, f"reading the sync state of {source!r}")
        found = json_object(resp, f"reading the sync state of {source!r}").get("entry")
        resources = (
            [e.get("resource") for e in found if isinstance(e, dict)] if isinstance(found, list) else []
        )
        entries: list[dict[str, Any]] = [
            r for r in resources if isinstance(r, dict) and r.get("resourceType") == "Basic"
        ]
        if len(entries) > 1:
            ids = ", ".join(str(r.get("id")) for r in entries)
            raise StateError(f"several Basic resources hold the state of {source!r}: {ids}",
                             hint="delete the duplicates in Medplum, keeping the newest")  # fmt: skip
        if not entries:
            self._ids.pop(source, None)
            return None, SyncState(source=source)
        self._remember(source, entries[0])
        return entries[0], self._parse(source, entries[0])

    def _create(self, state: SyncState) -> bool:
        """Conditional create (docs/medplum.md "Ids and identity", recorded case 49): `POST Basic` with
        `If-None-Exist: identifier=...`. True when ours was created (201); False when another writer
        created the record first (200 with theirs, nothing of ours written): it is remembered, so
        the caller goes on as after a lost If-Match race (look at it, then `PUT` by id)."""
        resp = self._send("POST", f"{self.fhir_url}Basic", content=orjson.dumps(self._resource(state.source, state)),
                          headers={"Content-Type": FHIR_JSON,
                                   "If-None-Exist": identifier_query(STATE_SYSTEM, state.source)})  # fmt: skip
        if resp.status_code == 409:
            # docs/medplum.md "Measured on a real server": concurrent creates collide in serializable transactions (409
            # conflict). The other create won: look at it, as after a 200.
            return False
        raise_for_status(resp, f"creating the sync state of {state.source!r}")
        self._remember(state.source, json_object(resp, f"creating the sync state of {state.source!r}"), resp)
        return resp.status_code == 201

    def _put(self, state: SyncState) -> bool:
        """PUT Basic/<id> with If-Match; False on 412 (someone else wrote since we read)."""
        rid, vid = self._ids[state.source]
        body = {**self._resource(state.source, state), "id": rid}
        resp = self._send("PUT", f"{self.fhir_url}Basic/{rid}", content=orjson.dumps(body),
                          headers={"Content-Type": FHIR_JSON, "If-Match": f'W/"{vid}"'})  # fmt: skip
        if resp.status_code == 412:
            return False
        raise_for_status(resp, f"saving the sync state of {state.source!r}")
        self._remember(state.source, json_object(resp, f"saving the sync state of {state.source!r}"), resp)
        return True

    # ---- StateStore ------------------------------------------------------------------------------
    def load(self, source: str) -> SyncState:
        res, current = self._fetch(source)
        if res is not None:
            self._check_mine(current)
        return current

    def _check_mine(self, current: SyncState) -> None:
        """While we hold a lease, every read must still show OUR lease token.

        A read refreshes the versionId that If-Match sends, so a read that saw someone else's lease
        followed by a save would overwrite their lease (and their newer checkpoint) with our stale
        state: two pods would run at once. Ours expired and was taken over (or cleared), so stop.
        """
        held = self._held.get(current.source)
        if held is None or (current.lease is not None and current.lease.token == held.lease.token):
            return
        now = current.lease.holder if current.lease else "nobody"
        raise LockedError(
            f"lost the lease of source {current.source!r} (now held by {now}): another run may have taken over",
            holder=now,
            hint="the lease expired before it was renewed; this run stops without saving",
        )

    def save(self, state: SyncState) -> None:
        held = self._held.get(state.source)
        for _ in range(3):
            if held is not None:
                held.lease = new_lease_like(held.lease, self.clock.now(), self.lease_ttl)
                state = _with_lease(state, held)
            if state.source not in self._ids:
                res, current = self._fetch(state.source)
                if res is None:
                    if self._create(state):
                        return
                    # Another writer created it between our search and our create: as on a 412,
                    # look at theirs before writing over it.
                else:
                    self._check_mine(current)
                    if self._put(state):
                        return
            elif self._put(state):
                return
            # 412: re-read. We may go on only while the lease is still ours (or nobody's).
            _, current = self._fetch(state.source)
            check_lease(current.source, current.lease, self.clock.now(), held.lease.token if held else None)
            self._check_mine(current)
        raise StateError(f"could not save the state of {state.source!r}: it kept changing under us")

    def acquire(self, source: str, holder: Holder) -> LeaseLock:
        for _ in range(3):
            res, current = self._fetch(source)
            check_lease(current.source, current.lease, self.clock.now())
            lease = new_lease(holder, self.clock.now(), self.lease_ttl)
            lock = LeaseLock(
                source, lease, self._renew_lock, self._release_lock, renew_every=self.lease_ttl / 3
            )
            state = _with_lease(current, lock)
            if res is None:
                if not self._create(state):
                    continue  # another pod created it first: look again (it may hold the lease now)
            elif not self._put(state):
                continue  # someone else wrote in between: look again (they may have taken it)
            self._held[source] = lock
            return lock
        raise LockedError(f"could not take the lease of source {source!r}: it is contended")

    def holder(self, source: str) -> Holder | None:
        _, current = self._fetch(source)
        lease = current.lease
        if lease is None or lease_expired(lease, self.clock.now()):
            return None
        return Holder(0, "", lease.expires, text=f"{lease.holder} (lease until {lease.expires})")

    def lease_of(self, source: str) -> str | None:
        """`holder (until expiry)` text for status, or None."""
        _, current = self._fetch(source)
        lease = current.lease
        if lease is None or lease_expired(lease, self.clock.now()):
            return None
        return f"{lease.holder} (lease until {lease.expires})"

    def _renew_lock(self, lock: LeaseLock) -> None:
        self.save(self.load(lock.source))  # load() refuses when the lease is no longer ours

    def _release_lock(self, lock: LeaseLock) -> None:
        self._held.pop(lock.source, None)
        for _ in range(3):
            _, current = self._fetch(lock.source)
            if current.lease is None or current.lease.token != lock.lease.token:
                return
            if self._put(_with_lease(current, None)):
                return


def new_lease_like(lease: Lease, now: float, ttl: float) -> Lease:
    return replace(lease, expires=iso(now + ttl))


def _with_lease(state: SyncState, lock: LeaseLock | None) -> SyncState:
    return replace(state, lease=None if lock is None else lock.lease)


def find_seed_checkpoint(medplum: MedplumClient) -> str | None:
    """The `lastSyncTime` of the Medplum Practice Fusion bot integration (a `Parameters` resource), or None.

    docs/medplum.md: Parameters has no identifier, so search them all (a project holds few) and pick
    the one that has a `lastSyncTime` parameter; the newest value wins if several do.
    """
    resp = medplum.send("GET", "Parameters?_count=100", cost="search")
    if resp.status_code == 404:
        return None
    if not resp.is_success:
        raise StateError(
            f"cannot search Medplum for the bot integration's lastSyncTime: {resp.status_code} {outcome_text(resp) or ''}"
        )
    found: list[str] = []
    entries = json_object(resp, "searching Medplum for the bot integration's lastSyncTime").get("entry")
    for entry in entries if isinstance(entries, list) else []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        params = res.get("parameter") if isinstance(res, dict) else None
        for param in params if isinstance(params, list) else []:
            if isinstance(param, dict) and param.get("name") == "lastSyncTime":
                value = param.get("valueDateTime") or param.get("valueInstant") or param.get("valueString")
                if isinstance(value, str) and value:
                    found.append(value)
    if not found:
        return None
    return max(found, key=parse_iso)
