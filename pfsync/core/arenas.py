"""How many malloc arenas the process may use: the one piece of memory tuning done in the process.

glibc gives threads that allocate at the same time arenas of their own, up to eight per core. The
export's download threads and the sender's Bundle threads each allocate, so a sync ends up with a
dozen arenas, and memory freed in one arena is kept there rather than given back: peak RSS then
grows with how long the run lasts, past what the byte-bounded budgets (the id map cache, parked
resources, the Bundles in flight) allow. Two arenas are enough for a process whose Python code runs
one thread at a time (the GIL), and keep RSS near what is live (docs/BENCHMARKS.md, "Scale").
`MALLOC_ARENA_MAX` in the environment, read by glibc itself, takes precedence.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter number for the arena limit (glibc's <malloc.h>: M_ARENA_MAX).
_M_ARENA_MAX = -8
ARENAS = 2


def cap_malloc_arenas() -> bool:
    """Limit glibc's malloc to ARENAS arenas; call before any thread starts. False where there is
    nothing to do: not Linux, not glibc (musl has no arenas), or the user chose MALLOC_ARENA_MAX."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    return bool(mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(ARENAS)))
