"""The pending ledger's account of what is in flight (pfsync.load.pending): handed, answered."""

from __future__ import annotations

from pfsync.load.pending import Pending

PATIENT = ("Patient", "p1")


def test_pending_an_identity_is_in_flight_until_every_entry_handed_is_answered() -> None:
    # Two entries of one identity in the sender (one sent, a newer one waiting for it): the first
    # answer leaves the identity coming; the second ends it.
    pending = Pending()
    assert not pending.holds(PATIENT)
    pending.hand(PATIENT)
    pending.hand(PATIENT)
    assert pending.holds(PATIENT) and pending.in_flight == 2
    pending.answered(PATIENT)
    assert pending.holds(PATIENT, parked=False) and pending.in_flight == 1
    pending.answered(PATIENT)
    assert not pending.holds(PATIENT) and pending.in_flight == 0
