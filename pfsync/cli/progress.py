"""Live progress on a terminal: one rich line per source (export, download, load) for `pfsync sync`.

Fed by the same events as the log (pfsync.core.events). Events other than `sync_source_*` carry no
source name; they belong to the source whose export id they carry (noted at its kick-off), else
to the source whose run is on the emitting thread, else to the only source running.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from pfsync.cli.common import plural


def make_progress(console: Any) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                    transient=False)  # fmt: skip


class SyncProgress:
    """An EventSink that keeps one progress line per source: what it is doing and how far it got."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        self._by_thread: dict[int, str] = {}
        self._by_export: dict[str, str] = {}  # export id -> source: download workers have their own threads
        self._active: list[str] = []
        self._files: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._loaded: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def _source(self, detail: dict[str, Any]) -> str | None:
        name = self._by_export.get(str(detail.get("exportId")))
        if name is None:
            name = self._by_thread.get(threading.get_ident())
        if name is None and len(self._active) == 1:
            name = self._active[0]
        return name

    def _show(self, name: str, text: str) -> None:
        self.progress.update(self._tasks[name], description=f"{name}: {text}")

    def emit(self, event: str, /, **d: Any) -> None:
        with self._lock:
            if event == "sync_source_start":
                name = str(d.get("source"))
                self._by_thread[threading.get_ident()] = name
                self._active.append(name)
                self._started[name] = time.monotonic()
                self._tasks[name] = self.progress.add_task(f"{name}: starting", total=None)
                return
            if event == "sync_source_complete":
                name = str(d.get("source"))
                if name in self._active:
                    self._active.remove(name)
                if name in self._tasks:
                    outcome = d.get("outcome")
                    counts = d.get("counts") or {}
                    written = sum(
                        int(c.get("created", 0)) + int(c.get("updated", 0)) for c in counts.values()
                    )
                    self._show(name, f"{outcome} ({written} written)")
                    self.progress.update(self._tasks[name], total=1, completed=1)
                return
            current = self._source(d)
            if event == "kickoff" and current is not None and d.get("exportId"):
                self._by_export[str(d["exportId"])] = current
            if current is not None and current in self._tasks:
                self._describe(current, event, d)

    def _describe(self, name: str, event: str, d: dict[str, Any]) -> None:
        if event == "kickoff":
            self._show(name, "export " + ("resumed" if d.get("resumed") else "kicked off"))
        elif event == "status_progress":
            self._show(name, f"export: waiting ({d.get('progress') or 'no progress reported'})")
        elif event == "status_complete":
            self._show(name, "export complete, downloading")
        elif event == "download_complete":
            self._files[name] = self._files.get(name, 0) + 1
            self._bytes[name] = self._bytes.get(name, 0) + int(d.get("bytes") or 0)
            self._show(
                name, f"downloaded {plural(self._files[name], 'file')}, {self._bytes[name] / 1e6:.1f} MB"
            )
        elif event == "load_progress":
            done = int(d.get("done") or 0)
            self._loaded[name] = done
            rate = done / max(0.001, time.monotonic() - self._started[name])
            quota = d.get("quota_remaining")
            self._show(name, f"loading {d.get('type')}: {done:,} resources, {rate:,.0f}/s"
                       + (f", quota left {quota:,}" if isinstance(quota, int) else ""))  # fmt: skip
        elif event == "load_complete":
            self._show(name, f"loaded: {d.get('created', 0)} created, {d.get('updated', 0)} updated, "
                       f"{d.get('unchanged', 0)} unchanged")  # fmt: skip
