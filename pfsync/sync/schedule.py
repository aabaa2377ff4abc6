"""`pfsync sync --every`: run in the foreground forever, and stop cleanly on SIGTERM/SIGINT.

A signal sets a stop Event: the export and the loader notice it, finish the Bundle in flight,
the state is saved and the run ends InterruptedRunError (resumable). Kubernetes sends SIGTERM
and waits terminationGracePeriodSeconds (30 s by default; our manifests give 120 s because one
Medplum Bundle can take close to a minute) before SIGKILL. A second signal stops waiting.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from pfsync.core.errors import ExitCode
from pfsync.net.http import RUN_STOP

log = logging.getLogger("pfsync.schedule")


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set `stop` (first) or raise KeyboardInterrupt (second). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def note_and_stop(name: str) -> None:
        log.warning("%s received: finishing the current Bundle, saving progress, then stopping", name,
                    extra={"event": "stop_requested"})  # fmt: skip
        stop.set()
        RUN_STOP.set()  # retry waits of every request end too (pfsync.net.http.wait)

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        # Not here: the handler runs on the main thread between two bytecodes, possibly while it
        # holds `stop`'s own (non-reentrant) lock inside stop.wait(), or is writing to stderr;
        # Event.set() or a log line from here could then deadlock. A thread waits its turn.
        threading.Thread(target=note_and_stop, args=(signal.Signals(signum).name,), daemon=True).start()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        RUN_STOP.clear()
        for sig, previous in old.items():
            signal.signal(sig, previous)


def run_every(
    run_once: Callable[[], int],
    interval: float,
    *,
    run_on_startup: bool,
    stop: threading.Event,
    on_result: Callable[[int], None] | None = None,
) -> int:
    """Call `run_once` every `interval` seconds until `stop` is set.

    Returns 0 when stopped between runs, 130 when a run was interrupted. A failed run is
    logged and the loop goes on (the next run retries: that is what a scheduler is for).
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    first = True
    while not stop.is_set():
        if not first or run_on_startup:
            code = run_once()
            if on_result is not None:
                on_result(code)
            if code == ExitCode.INTERRUPTED or stop.is_set():
                return int(ExitCode.INTERRUPTED) if code == ExitCode.INTERRUPTED else 0
            if code != ExitCode.OK:
                log.warning("sync run ended with exit code %d; next run in %.0f s", code, interval)
        first = False
        # Event.wait wakes at once on a signal: no sleeping through a SIGTERM.
        if stop.wait(interval):
            break
    return 0
