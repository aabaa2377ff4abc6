"""The state directory's layout: one definition of where each per-source file lives.

    {state_dir}/{source}/checkpoint.json     sync state (pfsync.sync.state, local backend)
    {state_dir}/{source}/lock                 the run lock (pfsync.sync.lock)
    {state_dir}/{source}/idmap.sqlite         source id -> Medplum id (pfsync.load.idmap)
    {state_dir}/{source}/quarantine.ndjson    resources that cannot land, with their reason
    {state_dir}/{source}/retry.ndjson         resources to send again next run
    {state_dir}/{source}/exports/             export runs (sync) and kept full exports (verify)

Imports nothing of pfsync but the error tree, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

from pfsync.core.errors import StateError

CHECKPOINT_FILE = "checkpoint.json"
LOCK_FILE = "lock"
IDMAP_FILE = "idmap.sqlite"
QUARANTINE_FILE = "quarantine.ndjson"
RETRY_FILE = "retry.ndjson"
EXPORTS_DIR = "exports"


def source_dir(state_dir: Path, source: str) -> Path:
    """`{state_dir}/{source}/`: the per-source directory; a name that is not one directory is refused."""
    if not source or "/" in source or source in (".", ".."):
        raise StateError(f"source name {source!r} cannot be used as a directory name")
    return state_dir / source
