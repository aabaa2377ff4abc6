"""Run locks: an flock'ed file for the local store, a lease with expiry for the Medplum store.

Two runs of the same source must never overlap (two loaders would race on the id map and the
checkpoint). Locally that is `fcntl.flock` on `{state_dir}/{source}/lock`: the kernel drops the
lock when the process dies (even on kill -9), so a crashed run never leaves a stale lock; the
holder (pid, host, start) is written inside for the error message and `pfsync status`. Stateless
pods share no disk, so the Medplum store uses a lease in the state's Basic resource instead,
taken and renewed with optimistic concurrency (docs/medplum.md "Optimistic locking").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from pfsync.core.errors import LockedError, PfsyncError, StateError
from pfsync.core.instants import iso, parse_iso
from pfsync.core.private import open_private, private_dir
from pfsync.sync.holders import Holder, Lease, RunLock

log = logging.getLogger("pfsync.sync")

LEASE_TTL = (
    15 * 60.0
)  # renewed on every state save and on a timer; a dead pod's lease frees itself after this


def _read_holder(fd: int) -> Holder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        doc = orjson.loads(data)
        return Holder(int(doc["pid"]), str(doc["host"]), str(doc["started"]))
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class FileLock:
    """An exclusive, non-blocking flock on a file that names its holder."""

    renew_every: float | None = None  # nothing to renew: the kernel holds the lock while we live

    def __init__(self, path: os.PathLike[str] | str, fd: int) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: os.PathLike[str] | str, holder: Holder) -> FileLock:
        """Lock at once or raise LockedError naming the current holder."""
        p = os.fspath(path)
        private_dir(Path(os.path.dirname(p) or "."))
        fd = open_private(Path(p), os.O_RDWR | os.O_CREAT)  # a link planted as the lock: refused
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd)
            os.close(fd)
            who = other.describe() if other else "another process"
            raise LockedError(
                f"another sync of this source is running ({who}; lock {p})",
                holder=who,
                hint="wait for it to finish; the lock is released automatically when that process exits",
            ) from None
        # Holder written only after we own the lock: the file never names a process that lost the race.
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps({"pid": holder.pid, "host": holder.host, "started": holder.started}), 0)
        os.fsync(fd)
        return cls(p, fd)

    @staticmethod
    def holder(path: os.PathLike[str] | str) -> Holder | None:
        """The current holder, or None when nobody holds the lock (a stale file is ignored)."""
        try:
            fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd) or Holder(0, "unknown", "unknown")
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def renew(self) -> None:
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lease_expired(lease: Lease, now: float) -> bool:
    try:
        return parse_iso(lease.expires) <= now
    except StateError:
        return True  # an unreadable expiry must not wedge every future run


def new_lease(holder: Holder, now: float, ttl: float = LEASE_TTL) -> Lease:
    return Lease(holder=holder.describe(), token=uuid.uuid4().hex, expires=iso(now + ttl))


def check_lease(source: str, lease: Lease | None, now: float, mine: str | None = None) -> None:
    """LockedError when someone else holds an unexpired lease on this source's state."""
    if lease is None or lease.token == mine or lease_expired(lease, now):
        return
    raise LockedError(
        f"another sync of source {source!r} holds the lease ({lease.holder}; until {lease.expires})",
        holder=lease.holder,
        hint="wait for it to finish; a crashed run's lease expires by itself",
    )


@dataclass
class LeaseLock:
    """A held Medplum lease. `renew` pushes the expiry out; `release` clears it."""

    source: str
    lease: Lease
    _renew: Callable[[LeaseLock], None]
    _release: Callable[[LeaseLock], None]
    released: bool = False
    renew_every: float = LEASE_TTL / 3  # Heartbeat renews on a timer: three chances per TTL

    def renew(self) -> None:
        if not self.released:
            self._renew(self)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)


class Heartbeat:
    """Renews a run's lock every `interval` seconds on its own thread, until `stop()`.

    Per-file renewal is not enough: one large file (or a slow export poll, or a Medplum Bundle
    waiting on the quota) can outlast the lease TTL, and another pod would then take over a source
    that is still being written. Renewal holds `mutex`, the one the run's state saves hold, so a
    renewal never writes an older state over a newer one (both go through the same If-Match chain).
    """

    def __init__(self, lock: RunLock, mutex: threading.Lock, interval: float, source: str) -> None:
        self._lock, self._mutex, self._interval, self._source = lock, mutex, interval, source
        self._done = threading.Event()
        self.renewals = 0
        self._thread = threading.Thread(target=self._loop, name=f"pfsync-lease-{source}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self._interval):
            try:
                with self._mutex:
                    self._lock.renew()
                self.renewals += 1
            except PfsyncError as exc:  # the next state save reports a lost lease as LockedError
                log.warning("could not renew the lease of %s: %s", self._source, exc.message)
            except Exception:  # a renewal bug must not kill the thread silently
                log.exception("lease renewal of %s failed", self._source)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=max(5.0, self._interval))
