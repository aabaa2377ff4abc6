"""Seeded generator of realistic, internally consistent FHIR R4 NDJSON (about 100 resources per patient).

Streaming: resources are written as they are made, so a million resources need flat memory. The output
passes strict validation (no empty strings or nulls, valid dates and codes) and mixes reference forms as
Synthea does: mostly `Type/id`, some bare `urn:uuid:<id>` (fixtures/README.md "Reference forms").
DocumentReferences carry attachments either inline (base64 `data`) or as a URL on the fixtures' origin
`http://127.0.0.1:9443/Binary/<id>`, which the source sandbox rewrites to its own base and serves.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from pfsync.sandbox.source.store import FIXTURE_ORIGIN

LOINC, SNOMED, RXNORM, CVX = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm", "http://hl7.org/fhir/sid/cvx"  # fmt: skip
# docs/practice-fusion.md "Defaults, identifiers and politeness": identifier systems
PF_ID = "https://practicefusion.com/fhir/{}-id"
GIVEN = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jamal",
    "Kira",
    "Luis",
    "Mei",
    "Noah",
]
FAMILY = ["Garcia", "Smith", "Nguyen", "Okafor", "Muller", "Rossi", "Kim", "Patel", "Cohen", "Silva", "Novak"]
VITALS = [("8867-4", "Heart rate", "/min", 55, 110), ("8310-5", "Body temperature", "Cel", 36.0, 38.5),
          ("29463-7", "Body weight", "kg", 8, 120), ("8302-2", "Body height", "cm", 60, 200),
          ("9279-1", "Respiratory rate", "/min", 10, 24)]  # fmt: skip
LABS = [("2339-0", "Glucose", "mg/dL", 65, 180), ("2093-3", "Cholesterol", "mg/dL", 120, 280),
        ("718-7", "Hemoglobin", "g/dL", 10, 18), ("2160-0", "Creatinine", "mg/dL", 0.5, 1.8)]  # fmt: skip
CONDITIONS = [("44054006", "Diabetes mellitus type 2"), ("38341003", "Hypertension"), ("195967001", "Asthma"),
              ("55822004", "Hyperlipidemia"), ("40055000", "Chronic sinusitis")]  # fmt: skip
MEDS = [("860975", "Metformin 500 MG Oral Tablet"), ("314076", "Lisinopril 10 MG Oral Tablet"),
        ("895994", "Albuterol 0.09 MG/ACTUAT Inhaler"), ("617311", "Atorvastatin 20 MG Oral Tablet")]  # fmt: skip
PROCEDURES = [
    ("73761001", "Colonoscopy"),
    ("430193006", "Medication reconciliation"),
    ("710824005", "Assessment of health"),
]
VACCINES = [("140", "Influenza, seasonal"), ("113", "Td (adult)"), ("133", "Pneumococcal conjugate PCV 13")]
ALLERGIES = [
    ("300916003", "Latex allergy"),
    ("91935009", "Allergy to peanuts"),
    ("294505008", "Allergy to penicillin"),
]
TYPES = ["Organization", "Practitioner", "Location", "Patient", "Encounter", "Condition", "Observation",
         "MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance", "DiagnosticReport",
         "DocumentReference"]  # fmt: skip


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def ref(self, rtype: str, rid: str, urn_share: float = 0.1) -> dict[str, str]:
        if self.rng.random() < urn_share:  # Synthea leftovers: bare urn:uuid references
            return {"reference": f"urn:uuid:{rid}"}
        return {"reference": f"{rtype}/{rid}"}

    def ident(self, rtype: str, rid: str) -> list[dict[str, str]]:
        return [{"system": PF_ID.format(rtype.lower()), "value": rid}]

    def shared(self) -> Iterator[dict[str, Any]]:
        self.orgs = [self.uid() for _ in range(3)]
        self.pracs = [self.uid() for _ in range(5)]
        self.locs = [self.uid() for _ in range(2)]
        for n, oid in enumerate(self.orgs):
            yield {"resourceType": "Organization", "id": oid, "identifier": self.ident("Organization", oid),
                   "active": True, "name": f"Sandbox Family Clinic {n + 1}",
                   "address": [{"city": "Springfield", "state": "MA", "country": "US"}]}  # fmt: skip
        for pid in self.pracs:
            yield {"resourceType": "Practitioner", "id": pid, "identifier": self.ident("Practitioner", pid),
                   "active": True, "name": [{"family": self.rng.choice(FAMILY), "given": [self.rng.choice(GIVEN)],
                                             "prefix": ["Dr."]}], "gender": self.rng.choice(["female", "male"])}  # fmt: skip
        for n, lid in enumerate(self.locs):
            yield {"resourceType": "Location", "id": lid, "status": "active", "name": f"Exam Room {n + 1}",
                   "managingOrganization": {"reference": f"Organization/{self.orgs[0]}"}}  # fmt: skip

    def patient(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        pid = self.uid()
        birth = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 80 * 365))
        yield {"resourceType": "Patient", "id": pid, "identifier": self.ident("Patient", pid), "active": True,
               "name": [{"use": "official", "family": rng.choice(FAMILY), "given": [rng.choice(GIVEN)]}],
               "gender": rng.choice(["female", "male"]), "birthDate": birth.isoformat(),
               "managingOrganization": {"reference": f"Organization/{self.orgs[0]}"}}  # fmt: skip

        def subject() -> dict[str, str]:  # a fresh (maybe urn) reference each time
            return self.ref("Patient", pid)

        for code, text in rng.sample(ALLERGIES, rng.randint(0, 2)):
            yield {"resourceType": "AllergyIntolerance", "id": self.uid(), "patient": subject(),
                   "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
                   "code": _cc(SNOMED, code, text), "recordedDate": f"{birth.year + 5}-06-01"}  # fmt: skip
        start = datetime(2015, 1, 1) + timedelta(days=rng.randrange(0, 365))
        for n in range(10):
            yield from self._visit(subject, start, n)

    def _visit(
        self, subject: Callable[[], dict[str, str]], start: datetime, n: int
    ) -> Iterator[dict[str, Any]]:
        """The patient's n-th visit: the Encounter, vitals, labs and their report, then what the visit
        found or ordered (`_visit_findings`)."""
        rng = self.rng
        when = start + timedelta(days=90 * n + rng.randrange(0, 30), hours=rng.randrange(8, 17))
        stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        eid = self.uid()
        prac = rng.choice(self.pracs)
        yield {"resourceType": "Encounter", "id": eid, "identifier": self.ident("Encounter", eid),
               "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
               "type": [_cc(SNOMED, "185349003", "Encounter for check up")], "subject": subject(),
               "participant": [{"individual": {"reference": f"Practitioner/{prac}"}}],
               "period": {"start": stamp, "end": (when + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")},
               "location": [{"location": {"reference": f"Location/{rng.choice(self.locs)}"}}],
               "serviceProvider": {"reference": f"Organization/{self.orgs[0]}"}}  # fmt: skip
        enc = self.ref("Encounter", eid)
        for code, text, unit, low, high in rng.sample(VITALS, 3):
            yield self._obs(subject(), enc, stamp, "vital-signs", "Vital Signs", code, text, unit, low, high)
        labs = [self._obs(subject(), enc, stamp, "laboratory", "Laboratory", *lab) for lab in LABS]
        yield from labs
        yield {"resourceType": "DiagnosticReport", "id": self.uid(), "status": "final",
               "category": [_cc("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
               "code": _cc(LOINC, "24323-8", "Comprehensive metabolic panel"), "subject": subject(),
               "encounter": enc, "effectiveDateTime": stamp, "issued": stamp,
               "result": [{"reference": f"Observation/{o['id']}"} for o in labs]}  # fmt: skip
        yield from self._visit_findings(subject, enc, stamp, when, prac, n)

    def _visit_findings(self, subject: Callable[[], dict[str, str]], enc: dict[str, str], stamp: str,
                        when: datetime, prac: str, n: int) -> Iterator[dict[str, Any]]:  # fmt: skip
        """A visit's findings by its number: a Condition every 4th, medication, vaccine and procedure every
        3rd, a document every 4th from the 2nd."""
        rng = self.rng
        if n % 4 == 0:
            code, text = rng.choice(CONDITIONS)
            active = rng.random() < 0.7
            status = ("active", "Active") if active else ("resolved", "Resolved")
            cond: dict[str, Any] = {"resourceType": "Condition", "id": self.uid(),
                "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", *status),
                "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
                "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")],
                "code": _cc(SNOMED, code, text), "subject": subject(), "encounter": enc, "onsetDateTime": stamp}  # fmt: skip
            if not active:
                cond["abatementDateTime"] = (when + timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
            yield cond
        if n % 3 == 0:
            code, text = rng.choice(MEDS)
            yield {"resourceType": "MedicationRequest", "id": self.uid(), "status": "active", "intent": "order",
                   "medicationCodeableConcept": _cc(RXNORM, code, text), "subject": subject(), "encounter": enc,
                   "authoredOn": stamp, "requester": {"reference": f"Practitioner/{prac}"}}  # fmt: skip
            code, text = rng.choice(VACCINES)
            yield {"resourceType": "Immunization", "id": self.uid(), "status": "completed",
                   "vaccineCode": _cc(CVX, code, text), "patient": subject(), "encounter": enc,
                   "occurrenceDateTime": stamp, "primarySource": True}  # fmt: skip
            code, text = rng.choice(PROCEDURES)
            yield {"resourceType": "Procedure", "id": self.uid(), "status": "completed",
                   "code": _cc(SNOMED, code, text), "subject": subject(), "encounter": enc,
                   "performedPeriod": {"start": stamp, "end": stamp}}  # fmt: skip
        if n % 4 == 1:
            yield self._document(subject(), enc, stamp, prac)

    def _obs(self, subject: dict[str, str], enc: dict[str, str], stamp: str, cat: str, cat_text: str,
             code: str, text: str, unit: str, low: float, high: float) -> dict[str, Any]:  # fmt: skip
        value = round(self.rng.uniform(low, high), 1)
        return {"resourceType": "Observation", "id": self.uid(), "status": "final",
                "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", cat, cat_text)],
                "code": _cc(LOINC, code, text), "subject": subject, "encounter": enc, "effectiveDateTime": stamp,
                "issued": stamp, "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                                                   "code": unit}}  # fmt: skip

    def _document(
        self, subject: dict[str, str], enc: dict[str, str], stamp: str, prac: str
    ) -> dict[str, Any]:
        did = self.uid()
        if self.rng.random() < 0.5:
            note = f"Visit note {did}: patient seen for a routine check up.".encode()
            attachment: dict[str, Any] = {"contentType": "text/plain", "data": base64.b64encode(note).decode(),
                                          "size": len(note), "title": "Visit note"}  # fmt: skip
        else:  # a URL to the source's Binary, on the fixtures' origin (rewritten by the sandbox)
            size = self.rng.randrange(2_000, 40_000)
            attachment = {"contentType": "application/pdf", "url": f"{FIXTURE_ORIGIN}/Binary/{self.uid()}",
                          "size": size, "title": "Scanned document"}  # fmt: skip
        return {"resourceType": "DocumentReference", "id": did, "status": "current",
                "type": _cc(LOINC, "34117-2", "History and physical note"), "subject": subject, "date": stamp,
                "author": [{"reference": f"Practitioner/{prac}"}], "content": [{"attachment": attachment}],
                "context": {"encounter": [enc]}}  # fmt: skip


def iter_resources(patients: int, seed: int) -> Iterator[dict[str, Any]]:
    """Shared Organizations/Practitioners/Locations, then each patient with their records."""
    gen = _Gen(seed)
    yield from gen.shared()
    for _ in range(patients):
        yield from gen.patient()


def iter_lines(patients: int, seed: int) -> Iterator[bytes]:
    """NDJSON lines (without newline) of `iter_resources`."""
    for resource in iter_resources(patients, seed):
        yield orjson.dumps(resource)


def generate(out_dir: Path, patients: int, seed: int) -> dict[str, int]:
    """Write `<Type>.ndjson` files into `out_dir`; returns counts per type."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    handles: dict[str, Any] = {}
    try:
        for resource in iter_resources(patients, seed):
            rtype = resource["resourceType"]
            if rtype not in handles:
                handles[rtype] = (out_dir / f"{rtype}.ndjson").open("wb")
            handles[rtype].write(orjson.dumps(resource) + b"\n")
            counts[rtype] = counts.get(rtype, 0) + 1
    finally:
        for handle in handles.values():
            handle.close()
    return counts
