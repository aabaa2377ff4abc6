"""Shared bits of the target sandbox: OperationOutcomes, errors, ids and Medplum's time formats."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

Json = dict[str, Any]

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# docs/medplum.md: "urn:uuid: fullUrl references are rewritten inside Bundles (lower-case hex only)".
URN_UUID_RE = re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TRACING_URL = "https://medplum.com/fhir/StructureDefinition/tracing"
FHIR_JSON = "application/fhir+json; charset=utf-8"


def new_id() -> str:
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    return bool(UUID_RE.match(value))


def now_instant() -> str:
    """meta.lastUpdated as Medplum writes it: millisecond precision, Z (docs/medplum.md, recorded case 08)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_instant(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def http_date(instant: str) -> str:
    """Last-Modified header value from a meta.lastUpdated instant."""
    return format_datetime(parse_instant(instant), usegmt=True)


def js_date_string(instant: str) -> str:
    """JavaScript Date.toString() in UTC, as in the history entry of a deletion (docs/medplum.md, recorded case 40)."""
    d = parse_instant(instant)
    return d.strftime("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)")


def tracing_extension() -> list[Json]:
    # docs/medplum.md "Surprises in the recordings", item 16: top-level outcomes carry requestId/traceId; batch entry outcomes do not.
    return [
        {
            "url": TRACING_URL,
            "extension": [{"url": "requestId", "valueId": new_id()}, {"url": "traceId", "valueId": new_id()}],
        }
    ]


def outcome(
    severity: str,
    code: str,
    text: str,
    *,
    oo_id: str | None = None,
    expression: list[str] | None = None,
    diagnostics: str | None = None,
    coding: list[Json] | None = None,
) -> Json:
    details: Json = {"coding": coding, "text": text} if coding else {"text": text}
    issue: Json = {"severity": severity, "code": code, "details": details}
    if diagnostics is not None:
        issue["diagnostics"] = diagnostics
    if expression:
        issue["expression"] = expression
    oo: Json = {"resourceType": "OperationOutcome"}
    if oo_id:
        oo["id"] = oo_id
    oo["issue"] = [issue]
    return oo


def ok_outcome() -> Json:
    return outcome("information", "informational", "All OK", oo_id="ok")


def created_outcome() -> Json:
    return outcome("information", "informational", "Created", oo_id="created")


class FhirError(Exception):
    """An operation failed with an HTTP status and an OperationOutcome (becomes a batch entry or a response)."""

    def __init__(self, status: int, oo: Json) -> None:
        super().__init__(oo["issue"][0]["details"].get("text", ""))
        self.status = status
        self.outcome = oo


def invalid(text: str, expression: list[str] | None = None, code: str = "invalid") -> FhirError:
    # 400 outcomes carry no id (docs/medplum.md "Surprises in the recordings", item 16).
    return FhirError(400, outcome("error", code, text, expression=expression))


def not_found() -> FhirError:
    return FhirError(404, outcome("error", "not-found", "Not found", oo_id="not-found"))


def gone() -> FhirError:
    return FhirError(410, outcome("error", "deleted", "Gone", oo_id="gone"))


def multiple_matches() -> FhirError:
    # docs/medplum.md, recorded cases 10 and 41: standalone conditional PUT / DELETE with >1 match.
    return FhirError(
        412,
        outcome(
            "error",
            "multiple-matches",
            "Multiple resources found matching condition",
            oo_id="multiple-matches",
        ),
    )


def precondition_failed() -> FhirError:
    return FhirError(412, outcome("error", "processing", "Precondition Failed", oo_id="precondition-failed"))


def too_large() -> FhirError:
    # docs/medplum.md, recorded case 27: the real server answered 400 "File too large", not 413.
    return FhirError(400, outcome("error", "invalid", "File too large"))


def conflict_outcome() -> Json:
    # docs/medplum.md, recorded case 30: PostgreSQL serialization failure under concurrent batches.
    return outcome(
        "error",
        "conflict",
        "could not serialize access due to read/write dependencies among transactions",
        oo_id="conflict",
        coding=[{"code": "40001"}],
    )
