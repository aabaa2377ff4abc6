"""The local run lock: flock on {state_dir}/{source}/lock, holder named, freed when the holder dies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfsync.core.errors import ExitCode, LockedError
from pfsync.sync.holders import Holder, Lease
from pfsync.sync.lock import FileLock, check_lease, lease_expired, new_lease
from pfsync.sync.state import LocalStateStore, SyncState

ME = Holder(4242, "host-a", "2026-01-01T00:00:00.000Z")


def test_file_lock_second_acquire_is_locked_error_naming_holder(tmp_path: Path) -> None:
    path = tmp_path / "src" / "lock"
    lock = FileLock.acquire(path, ME)
    with pytest.raises(LockedError) as info:
        FileLock.acquire(path, Holder(1, "host-b", "x"))
    assert info.value.exit_code == ExitCode.LOCKED
    assert "pid 4242 on host-a" in str(info.value)
    assert FileLock.holder(path) == ME
    lock.release()
    assert FileLock.holder(path) is None
    FileLock.acquire(path, ME).release()


def test_file_lock_holder_none_without_file(tmp_path: Path) -> None:
    assert FileLock.holder(tmp_path / "nope") is None


def test_file_lock_stale_file_is_not_a_holder(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_text('{"pid": 1, "host": "gone", "started": "x"}')
    assert FileLock.holder(path) is None
    FileLock.acquire(path, ME).release()


def test_file_lock_freed_when_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    code = (
        "import sys,time; from pfsync.sync.lock import FileLock; from pfsync.sync.holders import Holder;"
        f"FileLock.acquire({str(path)!r}, Holder.me()); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        holder = FileLock.holder(path)
        assert holder is not None and holder.pid == proc.pid
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            FileLock.acquire(path, ME)
    finally:
        proc.kill()
        proc.communicate()  # waits, and closes the pipe
    FileLock.acquire(path, ME).release()  # kill -9 leaves no stale lock


def test_local_store_lock_is_per_source(tmp_path: Path) -> None:
    store = LocalStateStore(tmp_path)
    a = store.acquire("a", ME)
    b = store.acquire("b", ME)
    assert store.holder("a") == ME
    assert (tmp_path / "a" / "lock").stat().st_mode & 0o777 == 0o600
    a.release()
    b.release()
    assert store.holder("a") is None


def test_lease_expiry_and_check() -> None:
    now = time.time()
    lease = new_lease(ME, now, ttl=60)
    assert not lease_expired(lease, now)
    assert lease_expired(lease, now + 61)
    state = SyncState(source="a", lease=lease)
    with pytest.raises(LockedError, match="pid 4242 on host-a"):
        check_lease(state.source, state.lease, now)
    check_lease(state.source, state.lease, now, mine=lease.token)  # our own lease
    check_lease(state.source, state.lease, now + 61)  # expired: free to take


def test_lease_with_garbage_expiry_counts_as_expired() -> None:

    assert lease_expired(Lease("x", "t", "garbage"), 0.0)
