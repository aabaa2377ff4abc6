"""Progress reporting through an observer, so the library never imports the UI (as in pip-audit).

The library calls `sink.emit(name, **detail)` with bulk-data-client's event vocabulary
(docs/bulk-data.md, "Logging vocabulary": kickoff, status_progress, status_complete, status_error,
download_request, download_complete, download_error, export_complete) plus `load_*`, `sync_*`
and `auth_*` events for our side. The CLI decides how to show them: rich progress on a TTY,
one JSON object per line otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class EventSink(Protocol):
    def emit(self, event: str, /, **detail: Any) -> None: ...


class NullSink:
    """Drops every event."""

    def emit(self, event: str, /, **detail: Any) -> None:
        return None


@dataclass
class FanoutSink:
    """Sends every event to several sinks."""

    sinks: list[EventSink]

    def emit(self, event: str, /, **detail: Any) -> None:
        for sink in self.sinks:
            sink.emit(event, **detail)
