"""Reference targets: resolution through the id map, resources held back, missing targets fetched.

A resource is written ONCE when its targets can be resolved in this run: until every same-source
target it names has a Medplum id, it is held on disk (id map `deferred`, with the targets it waits
for in `waits`), never written with a reference that a later write would have to fix (that would
double the quota a first sync costs: docs/medplum.md "Quotas and 429": on a stock project quota is the ceiling).

- Held resources whose targets got their ids are written at the next settle point (the end of a
  file, `Loader.flush`, `finish`): one query finds them (IdMap.ready).
- A target that no input names and that the rest of the input will not bring (its type is not
  expected: `expect(types)`, or every input was scanned up front) is fetched from the source early,
  batched per type: `GET {base}/{Type}?_id=a,b,c` (`_FETCH_CHUNK` ids per request). Without that
  knowledge the fetch waits for `finish`, still batched.
- At `finish`: missing targets are fetched, held resources are written as their targets arrive,
  then those that wait only for targets that will not arrive in this run (not in the source, or
  quarantined) are written with logical references (identifier of the target's system and source
  id, display kept) and remembered (`logical`); a reference cycle is broken by writing one member
  with logical references. Remembered resources are rewritten with literal references once their
  targets exist (this run or a later one).
- Refresh (`refresh_outside`, set by `pfsync sync`): a target of a type the export cannot deliver
  (Practitioner, Organization... of a Patient-level export) never comes again through the export,
  so a change at the source would never reach Medplum. Each such target that Medplum already holds
  is re-read from the source once per run when a resource of the run names it (the same batched
  `_id` searches), and every one of them Medplum holds is re-read when the last such whole-set
  pass (its time is kept in the sync state) is older than `refresh_referenced_after`. What comes back goes through the normal
  write path: unchanged content is skipped by its hash (no write, no quota), a change is an update.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from pfsync.core.errors import HTTPError
from pfsync.load.idmap import ANY_TYPE, Held, IdMap
from pfsync.load.transform import Prepared, Ref, Target, TransformContext, TransformError, prepare
from pfsync.medplum.batch import Entry
from pfsync.net.http import Clock, RetryPolicy, json_object, next_link, request_with_retry

if TYPE_CHECKING:
    from pfsync.load.writes import Writer

_FETCH_CHUNK = 50
_FETCH_ROUNDS = 5
_CYCLE_BATCH = 50
_URNS_MAX = 10_000  # resolved `urn:uuid` targets remembered (~2 MB); the id map answers the rest
# Never re-read: a Binary is its content (kept by its hash, pfsync.load.attachments); re-reading would
# download every one again.
_NO_REFRESH = frozenset({"Binary"})

# FHIR R4 Patient compartment (CompartmentDefinition/patient): what a Patient or Group level export
# can deliver. Anything else it references (Practitioner, Organization, Location, Medication...)
# has to be fetched from the source (docs/bulk-data.md: Patient-level export).
PATIENT_COMPARTMENT = frozenset({
    "Account", "AdverseEvent", "AllergyIntolerance", "Appointment", "AppointmentResponse", "AuditEvent",
    "Basic", "BodyStructure", "CarePlan", "CareTeam", "ChargeItem", "Claim", "ClaimResponse",
    "ClinicalImpression", "Communication", "CommunicationRequest", "Composition", "Condition", "Consent",
    "Coverage", "CoverageEligibilityRequest", "CoverageEligibilityResponse", "DetectedIssue", "DeviceRequest",
    "DeviceUseStatement", "DiagnosticReport", "DocumentManifest", "DocumentReference", "Encounter",
    "EnrollmentRequest", "EpisodeOfCare", "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal",
    "Group", "ImagingStudy", "Immunization", "ImmunizationEvaluation", "ImmunizationRecommendation",
    "Invoice", "List", "MeasureReport", "Media", "MedicationAdministration", "MedicationDispense",
    "MedicationRequest", "MedicationStatement", "MolecularSequence", "NutritionOrder", "Observation",
    "Patient", "Person", "Procedure", "Provenance", "QuestionnaireResponse", "RelatedPerson", "RequestGroup",
    "ResearchSubject", "RiskAssessment", "Schedule", "ServiceRequest", "Specimen", "SupplyDelivery",
    "SupplyRequest", "VisionPrescription",
})  # fmt: skip


def export_types(level: str, types: Iterable[str] | None) -> frozenset[str] | None:
    """The types an export of this level and `_type` can deliver (None: cannot tell, any type).

    For `Loader.expect_types`: a Patient/Group export delivers only the Patient compartment."""
    asked = frozenset(types) if types else None
    if level in ("patient", "group"):
        return asked & PATIENT_COMPARTMENT if asked is not None else PATIENT_COMPARTMENT
    return asked


class References:
    def __init__(
        self, writer: Writer, idmap: IdMap, ctx: TransformContext, source_client: httpx.Client | None,
        *, clock: Clock, retry: RetryPolicy,
    ) -> None:  # fmt: skip
        self._writer = writer
        self._idmap = idmap
        self._ctx = ctx
        self._client = source_client
        self._clock = clock
        self._retry = retry
        self._urns: dict[str, Target] = {}
        self._has_deferred = idmap.held_count("deferred") > 0
        self._has_logical = idmap.held_count("logical") > 0
        # This run's resources that keep logical references (the load summary's count; the id map
        # holds every run's): one key per such resource, ids only.
        self.logical_this_run: set[tuple[str, str]] = set()
        self._tried: set[tuple[str, str]] = set()
        self._queue: dict[str, set[str]] = {}  # type -> source ids to fetch
        self._in_fetch: set[tuple[str, str]] = set()  # fetched, not ingested yet
        self._fetched_types: set[str] = set()
        # Targets the source did not give us in this run (not there, or refused), and types it
        # refuses to read (no scope): what references them is written now with logical references
        # (upgraded by a later run), not held until `finish` with everything that depends on it.
        self._absent: set[tuple[str, str]] = set()
        self._refused: set[str] = set()
        # Type of an id outside the input, learnt from a typed reference to it (queued for a
        # fetch, absent or refused): a bare `urn:uuid:<id>` naming it then resolves the same way.
        self._outside: dict[str, str] = {}
        self._fetching = False
        self.expected: set[str] | None = None  # types the rest of the input may still bring
        self._delivered: frozenset[str] | None = None  # refresh targets of other types (None: never)
        self._whole_due = False  # every known target of those types is re-read at finish
        self._fetch_failed = False
        self.requests = 0
        self.held = 0
        self.refreshed = 0  # known targets re-read from the source in this run
        self.whole_refreshed_at: float | None = None  # when this run's whole-set pass started

    def target(self, ref: Ref) -> Target | None:
        """What the id map knows of a reference target (None: its type cannot be known)."""
        if ref.type is not None:
            row = self._idmap.get(ref.type, ref.id)
            return Target(ref.type, row.mid if row is not None else None)
        cached = self._urns.get(ref.id)
        if cached is not None:
            return cached
        rows = self._idmap.types_of(ref.id)
        loaded = [r for r in rows if r[1] is not None]
        # fixtures README: ids are unique across types, so an id names one resource.
        pick = rows[0] if len(rows) == 1 else (loaded[0] if len(loaded) == 1 else None)
        if pick is None:
            outside = self._outside.get(ref.id)
            return Target(outside, None) if outside is not None else None
        target = Target(pick[0], pick[1])
        if target.mid is not None:
            if len(self._urns) >= _URNS_MAX:
                self._urns.clear()  # a cache of the id map's answers: bounded, whatever the input's size
            self._urns[ref.id] = target
        return target

    def unresolved(self, p: Prepared) -> bool:
        """Whether some same-source target of `p` still has no Medplum id (even one that will not
        arrive in this run)."""
        for _, ref in p.refs:
            target = self.target(ref)
            if target is None or (target.mid is None and not (target.type == p.type and ref.id == p.sid)):
                return True
        return False

    def waits(self, p: Prepared, *, queue: bool = True) -> list[tuple[str, str]]:
        """The targets of `p` without a Medplum id yet; those the input will not bring are queued
        for a fetch from the source (`queue`)."""
        out: list[tuple[str, str]] = []
        # Typed references first: they tell the type of a bare urn:uuid naming the same target.
        for _, ref in sorted(p.refs, key=lambda item: item[1].type is None):
            target = self.target(ref)
            if target is None:
                out.append((ANY_TYPE, ref.id))
                continue
            if target.mid is not None:
                if queue and self._delivered is not None:
                    self._refresh(target.type, ref.id)
                continue
            if target.type == p.type and ref.id == p.sid:
                continue  # a self-reference cannot wait for itself
            key = (target.type, ref.id)
            if key in self._absent or (target.type in self._refused and self._will_not_arrive(key)):
                self._outside.setdefault(ref.id, target.type)
                continue  # will not arrive in this run: written now with a logical reference
            out.append(key)
            if queue and self._client is not None and key not in self._tried and self._will_not_arrive(key):
                self._queue.setdefault(target.type, set()).add(ref.id)
                self._outside.setdefault(ref.id, target.type)
        return out

    def refresh_outside(
        self, delivered: Iterable[str], whole_after: float | None, last: float | None
    ) -> None:
        """Keep targets of types not in `delivered` current (module docstring, "Refresh"); `last`:
        when every known one was last re-read (epoch seconds, None: never), due again once
        `whole_after` seconds have passed (None: only those named are re-read)."""
        self._delivered = frozenset(delivered)
        self._whole_due = whole_after is not None and (
            last is None or self._clock.now() - last >= whole_after
        )

    def _refresh(self, rtype: str, sid: str) -> None:
        """Queue a target Medplum holds for a re-read, if the export cannot bring its type."""
        if (
            self._client is None
            or self._delivered is None
            or self._whole_due  # every known one is re-read at finish: not twice
            or rtype in self._delivered
            or rtype in self._refused
            or rtype in _NO_REFRESH
            or (rtype, sid) in self._tried
        ):
            return
        self._queue.setdefault(rtype, set()).add(sid)
        self.refreshed += 1
        self._tried.add((rtype, sid))  # once per run

    def _refresh_whole_set(self) -> None:
        """Re-read every known target of a type the export cannot deliver, paged so memory stays
        flat: the id map knows them, or, when it is new (a stateless pod), a search of Medplum for
        our identifier system per such type does. `whole_refreshed_at` is set when it went well."""
        if self._client is None or self._delivered is None or not self._whole_due:
            return
        self._whole_due = False
        now = self._clock.now()
        self._fetch_failed = False
        types = set(self._idmap.counts())
        if self._idmap.cold:
            types |= set(self._ctx.source.resource_types) | self._fetched_types
        for rtype in sorted(types - self._delivered - _NO_REFRESH):
            for chunk in self._known_chunks(rtype):
                if rtype in self._refused:
                    break
                self.refreshed += len(chunk)
                self._fetch_and_ingest(rtype, chunk)
        if not self._fetch_failed:
            self.whole_refreshed_at = now

    def _known_chunks(self, rtype: str) -> Iterator[list[str]]:
        """The source ids of `rtype` Medplum holds, not re-read in this run yet, `_FETCH_CHUNK` at once."""
        if self._idmap.cold:
            ids = [sid for sid in self._writer.known_in_medplum(rtype) if (rtype, sid) not in self._tried]
            for i in range(0, len(ids), _FETCH_CHUNK):
                yield ids[i : i + _FETCH_CHUNK]
            return
        after = ""
        while True:
            page = self._idmap.loaded_ids(rtype, after, _FETCH_CHUNK)
            if not page:
                return
            after = page[-1]
            chunk = [sid for sid in page if (rtype, sid) not in self._tried]
            if chunk:
                yield chunk

    def _find_lost_logical(self) -> None:
        """A new id map (a stateless pod, a lost state directory) has lost the `logical` rows of
        earlier runs: find those resources in Medplum by their tag and re-read them from the
        source, so they are upgraded like remembered ones (one still unresolved is written as it
        was: same hash, no write)."""
        if not self._idmap.cold or self._client is None:
            return
        types = set(self._ctx.source.resource_types) | self._fetched_types
        for rtype in sorted(types - _NO_REFRESH):  # a Binary holds no references
            ids = [sid for sid in self._writer.logical_in_medplum(rtype)
                   if self._idmap.get(rtype, sid) is None and (rtype, sid) not in self._tried]  # fmt: skip
            for i in range(0, len(ids), _FETCH_CHUNK):
                self._fetch_and_ingest(rtype, ids[i : i + _FETCH_CHUNK])

    def queued(self, key: tuple[str, str]) -> bool:
        """Whether this target waits in the queue of fetches from the source, or is being fetched
        (a fetched chunk is ingested one resource at a time: answers taken in meanwhile wake
        resources waiting for a later one of the chunk, which is still on its way)."""
        ids = self._queue.get(key[0])
        return (ids is not None and key[1] in ids) or key in self._in_fetch

    def _will_not_arrive(self, key: tuple[str, str]) -> bool:
        if self.expected is None or self._idmap.get(*key) is not None:
            return False  # no hint, or an input named it: it is (or was) in the input
        return key[0] not in self.expected

    def defer(
        self, p: Prepared, file: str | None, line: int | None, raw: bytes, waits: list[tuple[str, str]]
    ) -> None:
        self._idmap.hold("deferred", Held(p.type, p.sid, file, line, raw), dict.fromkeys(waits))
        self._has_deferred = True
        self.held += 1

    def released(self, rtype: str, sid: str) -> None:
        """An identity is being written: an older held copy must not overwrite it later."""
        if self._has_deferred:
            self._idmap.release("deferred", rtype, sid)

    def hold_logical(self, entry: Entry) -> None:
        self._idmap.hold(
            "logical", Held(entry.type, entry.sid, entry.file, entry.line, entry.raw), entry.logical
        )
        self._has_logical = True
        self.logical_this_run.add(entry.key)

    def upgraded(self, rtype: str, sid: str) -> None:
        self.logical_this_run.discard((rtype, sid))
        if self._has_logical:
            self._idmap.release("logical", rtype, sid)

    # -- settle points
    def fetch_queued(self, *, full_only: bool) -> bool:
        """Fetch queued missing targets (`full_only`: only types with a full request's worth)."""
        if self._fetching:
            return False  # fetched resources are being ingested; they may queue more: next round
        self._fetching = True
        try:
            fetched = False
            while True:
                todo = [
                    (t, ids)
                    for t, ids in sorted(self._queue.items())
                    if len(ids) >= (_FETCH_CHUNK if full_only else 1)
                ]
                if not todo:
                    return fetched
                for rtype, ids in todo:
                    chunk = sorted(ids)[:_FETCH_CHUNK]
                    ids.difference_update(chunk)
                    if not ids:
                        self._queue.pop(rtype, None)
                    self._fetch_and_ingest(rtype, chunk)
                    fetched = True
        finally:
            self._fetching = False

    def failed(self, rtype: str, sid: str) -> None:
        """This identity was quarantined in this run: not something to fetch from the source."""
        self._tried.add((rtype, sid))

    def release_ready(self) -> int:
        """Write the held resources whose targets all have Medplum ids now; -> how many were taken."""
        if not self._has_deferred:
            return 0
        taken = 0
        while True:
            batch = self._idmap.ready()
            if not batch:
                return taken
            before = self._idmap.held_count("deferred")
            for held in batch:
                self._reingest(held, final=False)
            taken += len(batch)
            if self._idmap.held_count("deferred") >= before:
                return taken  # held again (nothing new resolved): no progress to make here

    def finish(self) -> None:
        """Everything held gets written (see the module docstring for the order)."""
        rounds = 0
        self._refresh_whole_set()
        self._find_lost_logical()
        while True:
            self._writer.drain()
            if self._client is not None and rounds < _FETCH_ROUNDS:
                for rtype, ids in self._idmap.missing_targets().items():
                    for sid in ids:
                        if (rtype, sid) not in self._tried:
                            self._queue.setdefault(rtype, set()).add(sid)
                # A bare `urn:uuid:<id>` no input named has no type to search: it is looked for
                # among the types this run had to fetch (ids are unique across types: fixtures README).
                for sid in self._idmap.unknown_ids():
                    for rtype in sorted(self._fetched_types):
                        if (rtype, sid) not in self._tried:
                            self._queue.setdefault(rtype, set()).add(sid)
                if self.fetch_queued(full_only=False):
                    rounds += 1
                    continue
            if not self._has_deferred or not self._idmap.held_count("deferred"):
                break
            before = self._idmap.held_count("deferred")
            if self.release_ready() and self._idmap.held_count("deferred") < before:
                continue
            # Nothing more will arrive: write what waits only for targets outside this run.
            batch = self._idmap.writable() or list(_first(self._idmap.held("deferred"), _CYCLE_BATCH))
            for held in batch:
                self._reingest(held, final=True)
        self._upgrade()

    def _reingest(self, held: Held, *, final: bool) -> None:
        # Released first: whatever happens to it now (written, quarantined, held again) replaces
        # this copy, so no held row can outlive its outcome.
        self._idmap.release("deferred", held.type, held.sid)
        resource = orjson.loads(held.raw)
        self._writer.ingest(resource, held.file, held.line, held.raw, final=final, first=False)

    def _upgrade(self) -> None:
        if not self._has_logical:
            return
        for held in self._idmap.upgradable():
            try:
                p = prepare(orjson.loads(held.raw), self._ctx)
            except TransformError:
                continue
            if not self.unresolved(p):
                self._reingest(held, final=True)
        self._writer.drain()

    # -- the source
    def _fetch_and_ingest(self, rtype: str, ids: list[str]) -> None:
        self._tried.update((rtype, i) for i in ids)
        self._fetched_types.add(rtype)
        missing = set(ids)
        self._in_fetch = {(rtype, i) for i in ids}
        try:
            for resource in self._fetch(rtype, ids):
                self._writer.count(rtype, "fetched")
                sid = resource["id"]
                missing.discard(sid)
                raw = orjson.dumps(resource)
                self._writer.ingest(resource, f"{self._ctx.base}/{rtype}", 0, raw, fetched=True)
                self._in_fetch.discard((rtype, sid))  # written, parked or held by now
        finally:
            self._in_fetch = set()
        for sid in sorted(missing):
            self._absent.add((rtype, sid))
            self._writer.not_coming((rtype, sid))  # what waits for it in memory looks again

    def _get(self, url: str, params: dict[str, str] | None) -> httpx.Response | None:
        assert self._client is not None
        client = self._client
        try:
            response = request_with_retry(
                lambda: client.get(url, params=params, headers={"Accept": "application/fhir+json"}),
                method="GET", url=url, policy=self._retry, clock=self._clock,
            )  # fmt: skip
        except HTTPError:
            self._fetch_failed = True
            return None  # the source is unwell: these targets stay logical until a later run
        self.requests += 1
        return response

    def _fetch(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        """The resources of `ids` the source has: one `_id` search (paged), per-id reads if refused."""
        url: str | None = f"{self._ctx.base}/{rtype}"
        params: dict[str, str] | None = {"_id": ",".join(ids), "_count": str(len(ids))}
        wanted = set(ids)
        out: list[dict[str, Any]] = []
        while url:
            response = self._get(url, params)
            if response is None:
                return out
            if response.status_code in (401, 403):
                self._refused.add(rtype)  # no read scope for the type: reads would be refused too
                return out
            if response.status_code != 200:
                return out + (self._fetch_each(rtype, ids) if not out else [])
            doc = json_object(response, f"the source's {rtype} search by _id")
            entries = doc.get("entry")
            for entry in entries if isinstance(entries, list) else []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == rtype
                    and resource.get("id") in wanted
                ):
                    wanted.discard(resource["id"])
                    out.append(resource)
            nxt = next_link(doc, str(response.request.url), f"the source's {rtype} search by _id")
            url = nxt if wanted and entries else None
            params = None
        return out

    def _fetch_each(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        """Servers without `_id` search: one read per id."""
        out = []
        for sid in ids:
            response = self._get(f"{self._ctx.base}/{rtype}/{sid}", None)
            if response is not None and response.status_code == 200:
                doc = orjson.loads(response.content)
                if isinstance(doc, dict) and doc.get("resourceType") == rtype:
                    out.append(doc)
        return out


def _first(items: Iterable[Held], n: int) -> list[Held]:
    out: list[Held] = []
    for item in items:
        out.append(item)
        if len(out) >= n:
            break
    return out
