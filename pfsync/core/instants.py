"""FHIR instants: epoch seconds to and from ISO-8601 UTC text (checkpoints, leases, manifests).

Owns only these two conversions; imports nothing of pfsync but the error tree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pfsync.core.errors import StateError


def iso(epoch: float) -> str:
    """Epoch seconds as an ISO-8601 UTC instant with milliseconds (FHIR instant shape)."""
    return (
        datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch * 1000) % 1000:03d}Z"
    )


def parse_iso(text: str) -> float:
    """Epoch seconds from an ISO-8601 instant (a FHIR `instant`, e.g. a manifest's transactionTime)."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise StateError(f"not an ISO-8601 instant: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
