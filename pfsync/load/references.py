"""Reference targets: resolution through the id map, what a resource waits for, what to fetch.

A resource is written ONCE when its targets can be resolved in this run: until every same-source
target it names has a Medplum id, it waits (parked or deferred: pfsync.load.pending; deferred on
disk with the targets it waits for: pfsync.load.holds), never written with a reference that a later
write would have to fix (that would double the quota a first sync costs: docs/medplum.md "Quotas and 429": on a stock project quota is the ceiling).

- Deferred resources whose targets got their ids are written at the next settle point (the end of a
  file, `Loader.flush`, `finish`), found from what changed since the last settle point (Holds.ready).
- A target that no input names and that the rest of the input will not bring (its type is not
  expected: `expect(types)`, or every input was scanned up front) is fetched from the source early,
  batched per type: `GET {base}/{Type}?_id=a,b,c` (`_FETCH_CHUNK` ids per request). Without that
  knowledge the fetch waits for `finish`, still batched.
- At `finish`: missing targets are fetched, deferred resources are written as their targets arrive,
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
  pass (its time is kept in the sync state) is older than `refresh_referenced_after`. What comes
  back goes through the normal write path: unchanged content is skipped by its hash (no write, no quota), a change is an update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import orjson

from pfsync.load.fetch import SourceReader
from pfsync.load.holds import ANY_TYPE, Held
from pfsync.load.idmap import IdMap
from pfsync.load.transform import Prepared, Ref, Target, TransformContext, TransformError, prepare
from pfsync.medplum.batch import Entry
from pfsync.net.http import Clock, RetryPolicy

_FETCH_CHUNK = 50
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
    """Decisions about reference targets: what a resource waits for, which targets to fetch from
    the source and which deferred resources to take back now. It never writes: the write path asks it and
    acts on the answers (pfsync.load.writes)."""

    def __init__(
        self, idmap: IdMap, ctx: TransformContext, source_client: httpx.Client | None,
        *, clock: Clock, retry: RetryPolicy,
    ) -> None:  # fmt: skip
        self._idmap = idmap
        self._holds = idmap.holds
        self._ctx = ctx
        self._source = (
            SourceReader(source_client, ctx.base, clock=clock, retry=retry)
            if source_client is not None
            else None
        )
        self._clock = clock
        self._urns: dict[str, Target] = {}
        self._has_deferred = self._holds.count("deferred") > 0
        self._has_logical = self._holds.count("logical") > 0
        # This run's resources that keep logical references (the load summary's count; the id map
        # holds every run's): one key per such resource, ids only.
        self.logical_this_run: set[tuple[str, str]] = set()
        self._tried: set[tuple[str, str]] = set()
        self._queue: dict[str, set[str]] = {}  # type -> source ids to fetch
        self._fetched_types: set[str] = set()
        # Targets the source did not give us in this run (not there, or refused), and types it
        # refuses to read (no scope): what references them is written now with logical references
        # (upgraded by a later run), not held until `finish` with everything that depends on it.
        self._absent: set[tuple[str, str]] = set()
        self._refused: set[str] = self._source.refused if self._source is not None else set()
        # Type of an id outside the input, learnt from a typed reference to it (queued for a
        # fetch, absent or refused): a bare `urn:uuid:<id>` naming it then resolves the same way.
        self._outside: dict[str, str] = {}
        self.expected: set[str] | None = None  # types the rest of the input may still bring
        self._delivered: frozenset[str] | None = None  # refresh targets of other types (None: never)
        self._whole_due = False  # every known target of those types is re-read at finish
        self.held = 0
        self.refreshed = 0  # known targets re-read from the source in this run
        self.whole_refreshed_at: float | None = None  # when this run's whole-set pass started

    @property
    def requests(self) -> int:
        return self._source.requests if self._source is not None else 0

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
            if queue and self._source is not None and key not in self._tried and self._will_not_arrive(key):
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
            self._source is None
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

    def whole_set(self, medplum_ids: Callable[[str], list[str]]) -> Iterator[tuple[str, list[str]]]:
        """The refresh of every known target of a type the export cannot deliver, as chunks to
        fetch (type, source ids), paged so memory stays flat: the id map knows them, or, when it is
        new (a stateless pod), `medplum_ids(type)` (a search of Medplum for our identifier system)
        does. `whole_refreshed_at` is set once every chunk was fetched without a failure."""
        if self._source is None or self._delivered is None or not self._whole_due:
            return
        self._whole_due = False
        assert self._source is not None
        now = self._clock.now()
        self._source.failed = False
        types = set(self._idmap.counts())
        if self._idmap.cold:
            types |= set(self._ctx.source.resource_types) | self._fetched_types
        for rtype in sorted(types - self._delivered - _NO_REFRESH):
            for chunk in self._known_chunks(rtype, medplum_ids):
                if rtype in self._refused:
                    break
                self.refreshed += len(chunk)
                yield rtype, chunk
        if not self._source.failed:
            self.whole_refreshed_at = now

    def _known_chunks(self, rtype: str, medplum_ids: Callable[[str], list[str]]) -> Iterator[list[str]]:
        """The source ids of `rtype` Medplum holds, not re-read in this run yet, `_FETCH_CHUNK` at once."""
        if self._idmap.cold:
            ids = [sid for sid in medplum_ids(rtype) if (rtype, sid) not in self._tried]
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

    def lost_logical(self, tagged_in_medplum: Callable[[str], list[str]]) -> Iterator[tuple[str, list[str]]]:
        """A new id map (a stateless pod, a lost state directory) has lost the `logical` rows of
        earlier runs: the chunks to re-read from the source of those `tagged_in_medplum(type)`
        finds in Medplum by their tag, so they are upgraded like remembered ones (one still
        unresolved is written as it was: same hash, no write)."""
        if not self._idmap.cold or self._source is None:
            return
        types = set(self._ctx.source.resource_types) | self._fetched_types
        for rtype in sorted(types - _NO_REFRESH):  # a Binary holds no references
            ids = [sid for sid in tagged_in_medplum(rtype)
                   if self._idmap.get(rtype, sid) is None and (rtype, sid) not in self._tried]  # fmt: skip
            for i in range(0, len(ids), _FETCH_CHUNK):
                yield rtype, ids[i : i + _FETCH_CHUNK]

    def queued(self, key: tuple[str, str]) -> bool:
        """Whether this target waits in the queue of fetches from the source."""
        ids = self._queue.get(key[0])
        return ids is not None and key[1] in ids

    def _will_not_arrive(self, key: tuple[str, str]) -> bool:
        if self.expected is None or self._idmap.get(*key) is not None:
            return False  # no hint, or an input named it: it is (or was) in the input
        return key[0] not in self.expected

    def defer(
        self, p: Prepared, file: str | None, line: int | None, raw: bytes, waits: list[tuple[str, str]]
    ) -> None:
        self._holds.hold("deferred", Held(p.type, p.sid, file, line, raw), dict.fromkeys(waits))
        self._has_deferred = True
        self.held += 1

    def released(self, rtype: str, sid: str) -> None:
        """An identity is being written: an older deferred copy must not overwrite it later."""
        if self._has_deferred:
            self._holds.release("deferred", rtype, sid)

    def remember_logical(self, entry: Entry) -> None:
        """Written with logical references: rewritten once their targets exist (`upgradable`)."""
        self._holds.hold(
            "logical", Held(entry.type, entry.sid, entry.file, entry.line, entry.raw), entry.logical
        )
        self._has_logical = True
        self.logical_this_run.add(entry.key)

    def upgraded(self, rtype: str, sid: str) -> None:
        self.logical_this_run.discard((rtype, sid))
        if self._has_logical:
            self._holds.release("logical", rtype, sid)

    def failed(self, rtype: str, sid: str) -> None:
        """This identity was quarantined in this run: not something to fetch from the source."""
        self._tried.add((rtype, sid))

    # -- what to do next (the write path acts on these answers)
    def fetch_types(self, *, full_only: bool) -> list[str]:
        """Types with targets queued for a fetch from the source (`full_only`: only those with a
        full request's worth queued), in the order to fetch them."""
        return [t for t, ids in sorted(self._queue.items()) if len(ids) >= (_FETCH_CHUNK if full_only else 1)]

    def take_chunk(self, rtype: str) -> list[str]:
        """Take one request's worth of queued targets of this type out of the queue."""
        ids = self._queue.get(rtype, set())
        chunk = sorted(ids)[:_FETCH_CHUNK]
        ids.difference_update(chunk)
        if not ids:
            self._queue.pop(rtype, None)
        return chunk

    def queue_missing(self) -> None:
        """Queue for a fetch every waited-for target no input brought (after a drain)."""
        if self._source is None:
            return
        for rtype, ids in self._holds.missing_targets().items():
            for sid in ids:
                if (rtype, sid) not in self._tried:
                    self._queue.setdefault(rtype, set()).add(sid)
        # A bare `urn:uuid:<id>` no input named has no type to search: it is looked for among the
        # types this run had to fetch (ids are unique across types: fixtures README).
        for sid in self._holds.unknown_ids():
            for rtype in sorted(self._fetched_types):
                if (rtype, sid) not in self._tried:
                    self._queue.setdefault(rtype, set()).add(sid)

    def deferred(self) -> int:
        """How many resources are deferred."""
        return self._holds.count("deferred") if self._has_deferred else 0

    def ready(self) -> list[Held]:
        """Deferred resources whose targets all have Medplum ids now (taken out of the id map)."""
        return self._take(self._holds.ready()) if self._has_deferred else []

    def last_resort(self) -> list[Held]:
        """Deferred resources to write with logical references, when nothing more will arrive:
        those waiting only for targets outside this run, else a batch that breaks a cycle."""
        return self._take(self._holds.writable() or list(_first(self._holds.held("deferred"), _CYCLE_BATCH)))

    def upgradable(self) -> Iterator[Held]:
        """Resources remembered with logical references whose targets all resolve now."""
        if not self._has_logical:
            return
        for held in self._holds.upgradable():
            try:
                p = prepare(orjson.loads(held.raw), self._ctx)
            except TransformError:
                continue
            if not self.unresolved(p):
                yield held

    def _take(self, batch: list[Held]) -> list[Held]:
        # Released first: whatever happens to each now (written, quarantined, deferred again)
        # replaces the copy on disk, so no deferred row can outlive its outcome.
        for held in batch:
            self._holds.release("deferred", held.type, held.sid)
        return batch

    # -- the source
    def fetch(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        """The resources of `ids` the source has (each id is asked once per run)."""
        self._tried.update((rtype, i) for i in ids)
        self._fetched_types.add(rtype)
        return self._source.read(rtype, ids) if self._source is not None else []

    def not_found(self, rtype: str, sids: Iterable[str]) -> None:
        """Fetched targets the source did not have: what references them is written with logical
        references from now on."""
        self._absent.update((rtype, sid) for sid in sids)


def _first(items: Iterable[Held], n: int) -> list[Held]:
    out: list[Held] = []
    for item in items:
        out.append(item)
        if len(out) >= n:
            break
    return out
