"""Who holds a source's run: the records a lock or a lease carries (`Holder`, `Lease`, `RunLock`).

Shared by the state stores (pfsync.sync.state, pfsync.sync.state_medplum) and the locks (pfsync.sync.lock), which
otherwise need nothing of each other; imports only pfsync.core.instants.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Protocol

from pfsync.core.instants import iso


@dataclass(frozen=True)
class Holder:
    """Who holds a lock or lease: shown in LockedError and `pfsync status`."""

    pid: int
    host: str
    started: str
    text: str | None = None  # a lease names its holder as text (the pod may be anywhere)

    def describe(self) -> str:
        return self.text or f"pid {self.pid} on {self.host} since {self.started}"

    @classmethod
    def me(cls, now: float | None = None) -> Holder:
        return cls(os.getpid(), socket.gethostname(), iso(time.time() if now is None else now))


@dataclass(frozen=True)
class Lease:
    """A run lease (Medplum backend): whoever holds an unexpired lease may run."""

    holder: str
    token: str
    expires: str


class RunLock(Protocol):
    """A held run lock or lease. `renew()` extends a lease (no-op for a file lock).

    `renew_every`: seconds between renewals a run should make (None: the lock needs none)."""

    @property
    def renew_every(self) -> float | None: ...

    def renew(self) -> None: ...
    def release(self) -> None: ...
