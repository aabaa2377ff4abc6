"""Test helper: every reference among the resources loaded into a TargetSandbox resolves there.

problems = check_references(target)   # [] when referential integrity holds
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pfsync.sandbox.target.server import TargetSandbox

# Every type the fixtures and the loader tests produce; callers may pass their own.
DEFAULT_TYPES = (
    "AllergyIntolerance", "Binary", "CarePlan", "CareTeam", "Claim", "Condition", "Device", "DiagnosticReport",
    "DocumentReference", "Encounter", "ExplanationOfBenefit", "Group", "ImagingStudy", "Immunization",
    "Location", "Medication", "MedicationRequest", "Observation", "Organization", "Patient", "Practitioner",
    "Procedure",
)  # fmt: skip


def references_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from references_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from references_in(item)


def check_references(target: TargetSandbox, types: Iterable[str] = DEFAULT_TYPES) -> list[str]:
    """One line per reference that does not name a live resource in the target (contained `#id`
    references must name a contained resource of the same resource)."""
    problems: list[str] = []
    for rtype in types:
        for resource in target.resources(rtype):
            where = f"{rtype}/{resource.get('id')}"
            contained = {c.get("id") for c in resource.get("contained") or [] if isinstance(c, dict)}
            for ref in references_in(resource):
                if ref.startswith("#"):
                    if ref[1:] not in contained:
                        problems.append(f"{where}: contained reference {ref} has no target")
                    continue
                parts = ref.split("/")
                if len(parts) != 2 or "?" in ref or ":" in ref:
                    problems.append(f"{where}: reference {ref!r} is not a literal Type/id")
                    continue
                row = target.store.read(parts[0], parts[1])
                if row is None or row.deleted:
                    problems.append(f"{where}: reference {ref} does not resolve")
    return problems


def count_references(target: TargetSandbox, types: Iterable[str] = DEFAULT_TYPES) -> int:
    return sum(1 for t in types for r in target.resources(t) for _ in references_in(r))
