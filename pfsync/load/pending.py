"""The write path's pending work: one ledger of what is read but has no outcome yet.

An identity is a (type, source id) pair. Between being read and having an outcome it is in one of
these states; these words mean these states everywhere in the write path (pfsync.load.writes):

- parked: a resource waiting in memory for reference targets that are coming.
- deferred: a resource waiting on disk (the id map's `deferred` rows) for targets that are not
  coming (pfsync.load.references decides what it waits for).
- probing: an entry waiting for the answer whether Medplum holds any resource of its type.
- lookup: an entry waiting for the batched identifier search of its type.
- recheck: an entry to route again from scratch (a stale Medplum id, a create with no known outcome).
- fetching: a reference target fetched from the source, not taken in yet.
- copying: a resource whose attachments are being copied (the copies run in pfsync.load.attachments).
- in flight: an entry handed to the sender (pfsync.medplum.upsert), queued, sent in a Bundle or
  released, until the sender reports its end.

And these words say what happens to an identity:

- coming: parked, probing, fetching, copying, in flight or queued for a fetch: its Medplum id is on
  its way, so what waits for it waits in memory.
- settle: its write has an outcome (written, quarantined, retry-queued) or will not come (deferred,
  not found at the source).
- wake: a parked resource is looked at again when a target it waits for settles; it is then
  written, parked again or deferred (pfsync.load.parking decides).
- hand / answer: an entry goes to the sender (in flight) / the sender reports its end (the reports
  of pfsync.medplum.bundlesend): settled (an outcome), exhausted (for the retry queue), recheck, or
  superseded.
- release: a create that waited in the sender behind another write of its identity leaves it
  when that write ends, still in flight; the router decides it again (an update by id, given back
  to the sender; unchanged; or a recheck) before anything else reaches the sender.
- supersede: a newer copy of an identity read meanwhile replaces a parked, copying or queued one,
  which is dropped.
- take back: at a settle point (the end of a file, a flush, the finish) deferred resources whose
  targets have Medplum ids are read again, and the id map is committed.

The ledger holds every state but deferred (the id map's, on disk). It only records: the writer
decides every transition (pfsync.load.parking for parked ones), except in flight, which the router
(pfsync.load.routing) records as it hands an entry to the sender and as it takes in the sender's
reports, right after each call to the sender: the sender never calls back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pfsync.load.transform import Prepared
from pfsync.medplum.batch import Entry

Key = tuple[str, str]


# What a parked resource costs in memory per byte of its NDJSON line: the line plus the parsed and
# prepared resource, 7-8 times the line for the sample data's types under tracemalloc.
PARK_BYTES_PER_RAW_BYTE = 8


@dataclass
class Waiting:
    """A prepared resource that is not written yet, with where it came from."""

    p: Prepared
    file: str | None
    line: int | None
    raw: bytes
    superseded: bool = False  # a newer copy of the identity was read: this one is dropped

    @property
    def key(self) -> Key:
        return (self.p.type, self.p.sid)

    @property
    def cost(self) -> int:
        """Estimated memory held while parked: the line plus the parsed and prepared resource."""
        return PARK_BYTES_PER_RAW_BYTE * len(self.raw)


class Pending:
    """The ledger (see the module docstring for its vocabulary)."""

    def __init__(self) -> None:
        self.parked: dict[Key, Waiting] = {}
        self.parked_bytes = 0  # estimated (Waiting.cost), bounded by load.park_max_bytes
        self._waiters: dict[Key, list[Key]] = {}  # target -> parked identities woken when it settles
        self._woken: list[Key] = []  # settled identities that parked ones wait for
        self._probing: dict[str, dict[str, Entry]] = {}  # type -> entries waiting for its probe
        self._lookups: dict[str, dict[str, Entry]] = {}  # type -> entries waiting for its search
        self._rechecks: list[Entry] = []
        self.fetching: set[Key] = set()
        self._copying: dict[Key, Waiting] = {}
        self._in_flight: dict[Key, int] = {}  # identity -> its entries handed and not answered
        self.in_flight = 0  # entries handed and not answered, of every identity

    def holds(self, key: Key, *, parked: bool = True) -> bool:
        """Whether the ledger holds this identity in a coming state (`parked`: parked ones count)."""
        if (
            key in self._in_flight
            or (parked and key in self.parked)
            or key in self.fetching
            or key in self._copying
        ):
            return True
        probing = self._probing.get(key[0])
        return probing is not None and key[1] in probing

    # -- parked
    def park(self, item: Waiting, target: Key) -> int:
        """Park a resource until `target` (one it waits for) settles; -> how many are parked."""
        old = self.parked.get(item.key)
        if old is not None:
            self.parked_bytes -= old.cost
        self.parked[item.key] = item
        self.parked_bytes += item.cost
        self.wait_for(item.key, target)
        return len(self.parked)

    def wait_for(self, key: Key, target: Key) -> None:
        """Keep a parked resource parked until `target` settles."""
        self._waiters.setdefault(target, []).append(key)

    def unpark(self, key: Key) -> None:
        self.parked_bytes -= self.parked.pop(key).cost

    def replace(self, key: Key) -> None:
        """A newer copy of this identity was read: a parked one, or one being copied, is dropped."""
        if self.parked:
            old = self.parked.pop(key, None)
            if old is not None:
                self.parked_bytes -= old.cost
        if self._copying:
            old = self._copying.pop(key, None)
            if old is not None:
                old.superseded = True

    def settle(self, key: Key) -> None:
        """This identity's write has an outcome or will not come: what is parked for it is woken."""
        if key in self._waiters:
            self._woken.append(key)

    @property
    def woke(self) -> bool:
        """Whether a parked resource was woken since it was last looked at."""
        return bool(self._woken)

    def woken(self) -> Iterator[tuple[Key, Waiting]]:
        """The parked resources to look at again, until none is woken (those woken meanwhile too)."""
        while self._woken:
            woken, self._woken = self._woken, []
            for target in woken:
                for key in self._waiters.pop(target, ()):
                    item = self.parked.get(key)
                    if item is not None:
                        yield key, item

    # -- copying
    def copy(self, item: Waiting) -> None:
        """Its attachments are being copied (an older copy of the identity being copied is dropped)."""
        old = self._copying.get(item.key)
        if old is not None:
            old.superseded = True
        self._copying[item.key] = item

    def copied(self, item: Waiting) -> None:
        """Its copies ended."""
        if self._copying.get(item.key) is item:
            del self._copying[item.key]

    # -- in flight
    def hand(self, key: Key) -> None:
        """An entry of this identity goes to the sender."""
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self.in_flight += 1

    def answered(self, key: Key) -> None:
        """The sender reported the end of one entry of this identity (`hand`)."""
        self.in_flight -= 1
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]

    # -- probing, lookup, recheck
    def await_probe(self, entry: Entry) -> None:
        queue = self._probing.setdefault(entry.type, {})
        queue.pop(entry.sid, None)
        queue[entry.sid] = entry

    def probed(self, rtype: str) -> Iterator[Entry]:
        """The entries that waited for this type's probe, one at a time: each stays probing (so
        coming) until the caller has routed the one before."""
        queue = self._probing.get(rtype, {})
        while queue:
            yield queue.pop(next(iter(queue)))
        self._probing.pop(rtype, None)

    def await_lookup(self, entry: Entry) -> int:
        """-> how many entries of its type wait for the search."""
        queue = self._lookups.setdefault(entry.type, {})
        queue.pop(entry.sid, None)
        queue[entry.sid] = entry
        return len(queue)

    def lookup_types(self) -> list[str]:
        return list(self._lookups)

    def take_lookup(self, rtype: str) -> dict[str, Entry]:
        return self._lookups.pop(rtype, None) or {}

    def recheck(self, entry: Entry) -> None:
        self._rechecks.append(entry)

    def take_rechecks(self) -> list[Entry]:
        again, self._rechecks = self._rechecks, []
        return again

    @property
    def probing(self) -> bool:
        return bool(self._probing)

    @property
    def looking_up(self) -> bool:
        return bool(self._lookups)
