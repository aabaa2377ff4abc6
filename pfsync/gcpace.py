"""The cyclic garbage collector's pace while a load runs.

A load allocates millions of short-lived objects (every parsed resource, every batch-response of
a hundred entries) that die by reference counting, never in cycles. At CPython's default
threshold (a collection every 700 net allocations) a batch-response alone set off a few
collections while it was being parsed, its objects were promoted and the older generations walked
again: 0.15-0.25 s of a 2.5 s benchmark load, holding the GIL, so the threads reading Bundle
answers stopped too (scripts/bench, `load`). While any Loader is open the first threshold is
raised; the collector still runs, just less often. The old thresholds come back when the last
Loader closes.
"""

from __future__ import annotations

import gc
import threading

_THRESHOLD0 = 50_000

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


def relax() -> None:
    """Raise the first threshold (counted: every call needs one `restore`)."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = gc.get_threshold()
            if _saved[0] != 0:  # 0: the application turned automatic collection off; keep that
                gc.set_threshold(max(_saved[0], _THRESHOLD0), *_saved[1:])
        _holders += 1


def restore() -> None:
    global _holders, _saved
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None
