"""Which sources a `pfsync sync` or `pfsync status` covers: all, one by name, or a shard of them.

`--shard I/N` runs the sources whose sha256(name) mod N equals I (a Kubernetes Indexed Job or N
cron entries split the practices without sharing any state).
"""

from __future__ import annotations

import hashlib

from pfsync.core.errors import UsageError
from pfsync.core.settings import Settings, SourceSettings


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` with 0 <= I < N (0-based: Kubernetes' JOB_COMPLETION_INDEX runs 0..N-1)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_of(name: str, n: int) -> int:
    """Stable across runs, machines and Python versions (not `hash()`): sha256 of the name, mod N."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % n


def select_sources(
    settings: Settings, name: str | None = None, shard: str | None = None
) -> list[SourceSettings]:
    if not settings.sources:
        settings.source(None)  # raises the one clear "no source is configured" ConfigError
    chosen = [settings.source(name)] if name else list(settings.sources)
    if shard:
        i, n = parse_shard(shard)
        chosen = [s for s in chosen if shard_of(s.name, n) == i]
    return chosen
