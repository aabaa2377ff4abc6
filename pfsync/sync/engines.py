"""What one sync run talks to: the `Engines` of a source and the loader they hand out.

pfsync.sync.run drives these protocols; pfsync.sync.live implements them over real HTTP and the
tests implement them in memory. Each method is called by the run as its docstring says; nothing
is optional, so a fake cannot skip a step (the credential proof, a file's flush) by leaving a
method out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from pfsync.core.counts import CountsByType
from pfsync.core.settings import SourceSettings
from pfsync.source.bulk import ExportRequest
from pfsync.source.exportjob import LandedFile


class LoadSummary(Protocol):
    """What a finished load reports (pfsync.load.loader.LoadResult)."""

    @property
    def by_type(self) -> CountsByType: ...
    @property
    def quota_used(self) -> int: ...


class SyncLoader(Protocol):
    """The loader as a sync run drives it (pfsync.load.loader.Loader; its docstrings say what each does)."""

    def retry_pending(self) -> None: ...
    def expect_types(self, types: Iterable[str] | None) -> None: ...
    def refresh_referenced(self, delivered: Iterable[str] | None, last_whole: str | None = None) -> None: ...
    def load_file(self, path: Path) -> None: ...
    def flush(self) -> None: ...
    def mark_loaded(self, key: str) -> None: ...
    def is_loaded(self, key: str) -> bool: ...
    def apply_deleted(self, path: Path) -> None: ...
    def finish(self) -> LoadSummary: ...
    @property
    def referenced_refreshed_at(self) -> float | None: ...


class Engines(Protocol):
    """What a run of one source talks to. `close()` releases clients."""

    def prove_credentials(self) -> None:
        """One token request to the source and one to Medplum, every run, before any work."""
        ...

    def run_export(
        self, request: ExportRequest, out_dir: Path, on_file: Callable[[LandedFile], None]
    ) -> str | None:
        """Run (or resume) one export into out_dir; returns the manifest's transactionTime."""
        ...

    def loader(self) -> AbstractContextManager[SyncLoader]: ...
    def group_members(self, group_id: str, scratch: Path) -> frozenset[str]: ...
    def seed_checkpoint(self) -> str | None: ...
    def close(self) -> None: ...


EngineFactory = Callable[[SourceSettings, threading.Event], Engines]
