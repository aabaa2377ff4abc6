"""CPython's collector and thread switching while a load runs (both process-wide, both restored).

- The collector: a load allocates millions of short-lived objects (every parsed resource, every
  batch-response of a hundred entries) that die by reference counting, never in cycles. At the
  default threshold (a collection every 700 net allocations) a batch-response alone set off a few
  collections while it was being parsed, its objects were promoted and the older generations
  walked again: 0.15-0.25 s of a 2.5 s benchmark load, holding the GIL. The first threshold is
  raised; the collector still runs, less often.
- Thread switching: the loader's thread parses and transforms for long stretches while worker
  threads send Bundles, read their answers, ask Medplum and copy attachments. Each of those needs
  the GIL back after every socket call, and at the default switch interval (5 ms) each such
  handover could wait 5 ms: an answer the server had sent 1 ms after the request sat unread for
  50 ms, the server idle meanwhile (server-side request log of the benchmark load). At 1 ms the
  benchmark load's median wall time fell 14% (6 interleaved rounds each; 0.2 ms was no better).

`relax` while any Loader is open (counted, so loaders closing out of order do not restore early);
the old settings come back when the last one closes.
"""

from __future__ import annotations

import gc
import sys
import threading

_THRESHOLD0 = 50_000
_SWITCH_INTERVAL = 0.001  # seconds

_lock = threading.Lock()
_holders = 0
_saved: tuple[tuple[int, int, int], float] | None = None


def relax() -> None:
    """Apply the load's settings (counted: every call needs one `restore`)."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            threshold, interval = gc.get_threshold(), sys.getswitchinterval()
            _saved = (threshold, interval)
            if threshold[0] != 0:  # 0: the application turned automatic collection off; keep that
                gc.set_threshold(max(threshold[0], _THRESHOLD0), *threshold[1:])
            sys.setswitchinterval(min(interval, _SWITCH_INTERVAL))
        _holders += 1


def restore() -> None:
    global _holders, _saved
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _saved is not None:
            gc.set_threshold(*_saved[0])
            sys.setswitchinterval(_saved[1])
            _saved = None
