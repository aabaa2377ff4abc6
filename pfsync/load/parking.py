"""Parked resources: which to write, which to keep parked, which to defer (decisions only).

A parked resource (pfsync.load.pending) waits in memory for targets that are coming. When one of
them settles, the resources parked for it are looked at again (`woken`): each one either stays
parked for a target still coming, or leaves memory, as a decision `(resource, waits)` that the
writer carries out: written when `waits` is empty, else deferred with those waits. Only the woken
ones are looked at: thousands can be parked at the start of a first load.
"""

from __future__ import annotations

from collections.abc import Iterator

from pfsync.load.pending import Key, Pending, Waiting
from pfsync.load.references import References

# A resource leaving memory, and the targets it still waits for (none: it is written now).
Leave = tuple[Waiting, list[Key]]


class Parking:
    """Decides over the ledger's parked resources; asks the ledger and the fetch queue what is
    coming. `sending`: writes go to Medplum (in a dry run nothing is coming)."""

    def __init__(self, pending: Pending, refs: References, *, sending: bool) -> None:
        self._pending = pending
        self._refs = refs
        self._sending = sending

    def coming(self, key: Key, *, parked: bool = True) -> bool:
        """Whether this identity is coming (pfsync.load.pending): its Medplum id is on its way."""
        if not self._sending or not key[0]:
            return False
        return self._pending.holds(key, parked=parked) or self._refs.queued(key)

    def woken(self) -> Iterator[Leave]:
        """The woken parked resources that leave memory (the others are parked again)."""
        for key, item in self._pending.woken():
            waits = self._refs.waits(item.p, queue=False)
            if waits and all(self.coming(k) for k in waits):
                self._pending.wait_for(key, waits[0])
            else:
                self._pending.unpark(key)
                yield item, waits

    def at_drain(self) -> Iterator[Leave]:
        """Every parked resource whose targets all have ids leaves; those whose targets are (through
        other parked ones) in flight stay parked, as their targets are about to be
        written; the rest leave for the disk: a parked cycle, or targets whose writes ended
        without an id."""
        moving: set[Key] = set()  # parked, and every target is in the sender or moving
        parked = self._pending.parked
        changed = True
        while changed:
            changed = False
            for key, item in list(parked.items()):
                if key in moving or key not in parked:
                    continue
                waits = self._refs.waits(item.p, queue=False)
                if not waits:
                    self._pending.unpark(key)
                    yield item, waits
                    changed = True
                elif all(k in moving or self.coming(k, parked=False) for k in waits):
                    moving.add(key)
                    self._pending.wait_for(key, waits[0])
                    changed = True
        yield from self.all_but(moving)

    def all_but(self, keep: frozenset[Key] | set[Key] = frozenset()) -> Iterator[Leave]:
        """Every parked resource but `keep` leaves memory."""
        for key, item in list(self._pending.parked.items()):
            if key not in keep:
                self._pending.unpark(key)
                yield item, self._refs.waits(item.p, queue=False)
