"""How pfsync marks what it writes to Medplum, and how it finds it again.

The tags below travel in `meta.tag` of every resource the loader writes; the search helpers build
the token queries that find resources by identifier (docs/medplum.md, "Searching").
Used by loading (writing the marks), the Medplum lookups and state (finding), and verify (ignoring
our own marks when comparing content).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

Json = dict[str, Any]

# A stable tag carrying the content hash: identical input gives an identical body, so Medplum's
# no-op detection works (docs/medplum.md "Conditional update": any field that changes every run defeats
# it), and a lost id map can be rebuilt with hashes from a search (meta.tag is kept as sent).
HASH_TAG_SYSTEM = "https://pfsync.dev/content-hash"
# Marks a resource written with logical references (not part of the hash: the references are),
# so a run whose id map is lost (a stateless pod) finds it by `_tag` search and upgrades it.
LOGICAL_TAG = {"system": "https://pfsync.dev/references", "code": "logical"}
# The owner mark: every resource the loader writes carries {system: OWNER_TAG_SYSTEM, code: source
# name}, and a Medplum resource found by identifier counts as this source's only when it carries it
# (`owned`). Like the hash tag it is added after hashing, so it never changes the content hash and
# resources written before it existed are not rewritten just to gain it (see `owned` for those).
OWNER_TAG_SYSTEM = "https://pfsync.dev/source"
OUR_TAG_SYSTEMS = frozenset({HASH_TAG_SYSTEM, LOGICAL_TAG["system"], OWNER_TAG_SYSTEM})


def escape_token(value: str) -> str:
    """A token search value with the characters Medplum treats specially escaped (commas mean OR)."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def identifier_query(system: str, value: str) -> str:
    """`identifier=system|value`, percent-encoded for a URL (docs/medplum.md: commas escaped as `\\,`)."""
    return "identifier=" + quote(f"{system}|{escape_token(value)}", safe=":/|")


def resource_hash_from_meta(resource: Json) -> str | None:
    """Our content hash as stored on a Medplum resource (from a search), if any."""
    meta = resource.get("meta")
    if isinstance(meta, dict):
        for tag in meta.get("tag") or []:
            if isinstance(tag, dict) and tag.get("system") == HASH_TAG_SYSTEM:
                code = tag.get("code")
                return code if isinstance(code, str) else None
    return None
