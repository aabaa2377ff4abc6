"""SMART system scopes: v1 (`.read`) or v2 (`.rs`) syntax, the scopes to request for a list of
resource types, and which types a granted scope lets a system client read (wildcards included).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

ScopeVersion = Literal["v1", "v2"]


def choose_scope_version(setting: str, capabilities: Iterable[str]) -> ScopeVersion:
    """v1 `.read` or v2 `.rs`: forced by setting, else v2 when the server advertises permission-v2."""
    if setting in ("v1", "v2"):
        return setting  # type: ignore[return-value]
    return "v2" if "permission-v2" in set(capabilities) else "v1"


def build_scopes(types: Sequence[str], version: ScopeVersion) -> tuple[str, ...]:
    suffix = ".rs" if version == "v2" else ".read"
    return tuple(f"system/{t}{suffix}" for t in dict.fromkeys(types))


def _grants_read(permission: str) -> bool:
    if permission in ("read", "*"):  # v1 (system/*.* included)
        return True
    # v2: any subset of "cruds" that includes r (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html)
    return bool(permission) and set(permission) <= set("cruds") and "r" in permission


def readable_types(scopes: Iterable[str]) -> frozenset[str]:
    """Types a set of granted scopes lets a system client read; "*" for a wildcard grant."""
    types: set[str] = set()
    for scope in scopes:
        context, _, rest = scope.partition("/")
        rtype, _, permission = rest.partition(".")
        if context == "system" and rtype and _grants_read(permission):
            types.add(rtype)
    return frozenset(types)


def split_granted(granted: Iterable[str], requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """(granted, not granted) among the requested types, honouring wildcards like system/*.read."""
    readable = readable_types(granted)
    ok = [t for t in requested if "*" in readable or t in readable]
    return ok, [t for t in requested if t not in ok]
