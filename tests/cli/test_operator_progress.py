"""`pfsync sync`'s live lines (issue 17): one per source, through export, download and load, with
events from worker threads attributed to the right source."""

from __future__ import annotations

import io
import threading

from rich.console import Console

from pfsync.cli.progress import SyncProgress, make_progress


def _lines(progress: object) -> dict[str, str]:
    tasks = progress.tasks  # type: ignore[attr-defined]
    return {t.description.split(":", 1)[0]: t.description.split(": ", 1)[1] for t in tasks}


def test_sync_progress_follows_each_source_through_its_phases() -> None:
    progress = make_progress(Console(file=io.StringIO()))
    sink = SyncProgress(progress)
    ready = {name: threading.Event() for name in ("a", "b")}

    def run(name: str, export_id: str) -> None:
        sink.emit("sync_source_start", source=name)
        sink.emit("kickoff", exportId=export_id, resumed=False)
        ready[name].set()

    threads = [threading.Thread(target=run, args=(n, f"job-{n}")) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _lines(progress) == {"a": "export kicked off", "b": "export kicked off"}

    # Download workers run on threads of their own: the export id says whose file it is.
    worker = threading.Thread(
        target=lambda: sink.emit("download_complete", exportId="job-b", bytes=2_000_000)
    )
    worker.start()
    worker.join()
    assert _lines(progress)["b"] == "downloaded 1 file, 2.0 MB"
    assert _lines(progress)["a"] == "export kicked off"

    sink.emit(
        "sync_source_complete", source="a", outcome="ok", counts={"Patient": {"created": 3, "updated": 1}}
    )
    assert _lines(progress)["a"] == "ok (4 written)"


def test_export_progress_lines_fit_80_columns_with_a_uuid_export_id() -> None:
    from rich.progress import Progress, TextColumn

    from pfsync.cli.export import ProgressSink

    progress = Progress(TextColumn("{task.description}"), console=Console(file=io.StringIO(), width=80))
    sink = ProgressSink(progress)
    job = "bc896679-3287-4b1c-940d-fc625547de8d"
    sink.emit("kickoff", exportId=job, resumed=False)
    sink.emit("status_progress", exportId=job, progress="21% complete", retryIn=1.5)
    sink.emit("status_complete", exportId=job, transactionTime="2026-12-05T12:36:13.569Z")
    (status, _total) = progress.tasks
    assert status.description == "export bc896679: complete at 2026-12-05T12:36:13.569Z"
