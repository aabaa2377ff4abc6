"""The malloc arena cap (pfsync.core.arenas): counted from glibc's own statistics in a child process
whose threads allocate at the same time, as the export's downloads and the sender's Bundles do."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Eight threads alive at once, each allocating small objects; then glibc prints one "Arena N:"
# block per arena to stderr.
_PROBE = """
import ctypes, sys, threading
if sys.argv[1] == "cap":
    from pfsync.core.arenas import cap_malloc_arenas
    print(cap_malloc_arenas())
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    kept = [bytes(100) + b"x" for _ in range(20000)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout.strip(), sum(line.startswith("Arena ") for line in run.stderr.splitlines())


def test_arenas_uncapped_threads_get_arenas_of_their_own() -> None:
    # What the cap is for: without it the probe sees more than two.
    _, arenas = _arenas("none")
    assert arenas > 2


def test_arenas_capped_to_two() -> None:
    applied, arenas = _arenas("cap")
    assert applied == "True"
    assert arenas <= 2


def test_arenas_the_users_malloc_arena_max_wins() -> None:
    applied, arenas = _arenas("cap", MALLOC_ARENA_MAX="4")
    assert applied == "False"
    assert arenas == 4


def test_arenas_cli_caps_before_any_command_runs() -> None:
    code = "import sys, unittest.mock as m, pfsync.cli as c\n" \
           "with m.patch.object(c, 'cap_malloc_arenas') as cap, m.patch.object(c, 'app', return_value=0):\n" \
           "    try: c.main()\n" \
           "    except SystemExit: pass\n" \
           "print(cap.call_count)"  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "1", run.stderr
