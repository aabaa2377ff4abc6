"""pfsync.load.holds: resources held on disk (deferred, logical) and which of them are ready."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pfsync.load.holds import ANY_TYPE, Held
from pfsync.load.idmap import IdMap


def _item(sid: str, rtype: str = "Observation") -> Held:
    return Held(rtype, sid, "f.ndjson", 1, b"{}")


def _ready(m: IdMap) -> list[str]:
    """What `ready` hands out now, taken as References._take does (released)."""
    out = []
    while batch := m.holds.ready(limit=2):
        for held in batch:
            m.holds.release("deferred", held.type, held.sid)
            out.append(held.sid)
    return out


def test_holds_held_tables_page_and_release(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    for i in range(1203):
        m.holds.hold("deferred", Held("Observation", f"o{i:05d}", "f.ndjson", i, b"{}"))
    m.holds.hold("deferred", Held("Observation", "o00001", "g.ndjson", 9, b"{}"))  # replaces
    assert m.holds.count("deferred") == 1203
    items = list(m.holds.held("deferred"))
    assert len(items) == 1203 and items[1].file == "g.ndjson"
    m.holds.release("deferred", "Observation", "o00001")
    m.holds.release("deferred", "Observation", "never-held")
    assert not m.holds.is_held("deferred", "Observation", "o00001")
    assert m.holds.count("deferred") == 1202 and m.holds.count("logical") == 0
    m.close()
    m = IdMap(tmp_path / "i.sqlite", target="t")
    assert m.holds.count("deferred") == 1202  # counted again on open, kept since
    m.close()


def test_holds_upgradable_lists_logical_rows_whose_targets_arrived(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    m = IdMap(path, target="t")
    h = m.holds
    h.hold("logical", Held("Encounter", "e1", "f", 1, b"{}"), [("Organization", "o1")])  # refused type
    h.hold(
        "logical", Held("Encounter", "e2", "f", 2, b"{}"), [("Practitioner", "dr"), ("Organization", "o1")]
    )
    h.hold("logical", Held("Encounter", "e3", "f", 3, b"{}"))  # held before targets were recorded
    assert [x.sid for x in h.upgradable()] == ["e3"]
    m.record("Practitioner", "dr", "m-dr", None, None)  # one of e2's targets arrived
    assert [x.sid for x in h.upgradable()] == ["e2", "e3"]
    h.release("logical", "Encounter", "e2")
    h.hold("logical", Held("Encounter", "e2", "f", 2, b"{}"), [("Organization", "o1")])  # written again
    assert [x.sid for x in h.upgradable()] == ["e3"]
    m.close()
    with sqlite3.connect(path) as db:  # the released row's targets went with it
        assert db.execute("SELECT type, sid, ttype, tsid FROM logical_waits ORDER BY sid").fetchall() == [
            ("Encounter", "e1", "Organization", "o1"),
            ("Encounter", "e2", "Organization", "o1"),
        ]


def test_holds_ready_once_every_target_has_a_medplum_id(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    m.holds.hold("deferred", _item("o1"), [("Patient", "p1"), ("Encounter", "e1")])
    m.holds.hold("deferred", _item("o2"), [("Patient", "p1")])
    m.holds.hold("deferred", _item("o3"), [(ANY_TYPE, "u1")])  # a bare urn:uuid: any type ends it
    m.holds.hold("deferred", _item("o4"))  # waits for nothing
    assert _ready(m) == ["o4"]
    m.record("Patient", "p1", "m-p1", None, None)
    assert _ready(m) == ["o2"]
    m.record("Encounter", "e1", "m-e1", None, None)
    m.record("Device", "u1", "m-u1", None, None)
    assert _ready(m) == ["o1", "o3"]
    assert _ready(m) == [] and m.holds.count("deferred") == 0
    m.close()


def test_holds_ready_ignores_an_arrival_undone_and_sees_targets_that_came_first(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    m.holds.hold("deferred", _item("o1"), [("Patient", "p1")])
    m.record("Patient", "p1", "m-p1", None, None)
    m.forget("Patient", "p1")  # a stale id: Medplum no longer has it
    assert _ready(m) == []
    m.record("Patient", "p2", "m-p2", None, None)
    m.commit()
    m.holds.hold("deferred", _item("o2"), [("Patient", "p2")])  # held after its target arrived
    assert _ready(m) == ["o2"]
    m.close()


def test_holds_ready_hands_a_row_held_again_out_only_for_its_new_waits(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    m.holds.hold("deferred", _item("o1"), [("Patient", "p1")])
    m.record("Patient", "p1", "m-p1", None, None)
    m.holds.hold("deferred", _item("o1"), [("Patient", "p2")])  # re-read: it waits for another now
    assert _ready(m) == []
    m.record("Patient", "p2", "m-p2", None, None)
    assert _ready(m) == ["o1"]
    m.close()


def test_holds_ready_finds_rows_an_earlier_run_left_whose_targets_arrived(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    m = IdMap(path, target="t")
    m.holds.hold("deferred", _item("o1"), [("Patient", "p1")])
    m.holds.hold("deferred", _item("o2"), [("Patient", "p2")])
    m.commit()
    m.record("Patient", "p1", "m-p1", None, None)  # arrived; the run ended before a settle point
    m.close()
    m = IdMap(path, target="t")
    assert _ready(m) == ["o1"]
    m.record("Patient", "p2", "m-p2", None, None)
    assert _ready(m) == ["o2"]
    m.close()


def test_holds_another_target_drops_logical_rows_and_keeps_deferred_ones(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    m = IdMap(path, target="http://a/")
    m.holds.hold("deferred", _item("o1"), [("Patient", "p1")])
    m.holds.hold("logical", _item("o2"), [("Organization", "x")])
    m.close()
    m = IdMap(path, target="http://b/")
    assert m.holds.count("deferred") == 1 and m.holds.count("logical") == 0
    m.close()


def _ready_cost(tmp_path: Path, held: int) -> int:
    """SQLite VM steps (in thousands) of one `ready` that finds 10 rows among `held` deferred ones."""
    m = IdMap(tmp_path / f"cost{held}.sqlite", target="t")
    for i in range(held):
        m.holds.hold("deferred", _item(f"o{i:06d}"), [("Patient", f"p{i:06d}")])
    assert m.holds.ready() == []
    for i in range(10):
        m.record("Patient", f"p{i:06d}", f"m{i}", None, None)
    m.commit()
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    m._db.set_progress_handler(tick, 1000)
    assert len(m.holds.ready()) == 10
    m._db.set_progress_handler(None, 0)
    m.close()
    return steps[0]


def test_holds_ready_reads_what_changed_not_every_held_row(tmp_path: Path) -> None:
    """The work of `ready` follows the arrivals, not the number of held rows (counted in SQLite VM
    steps, never timed): ten times the held rows, about the same steps."""
    small, large = _ready_cost(tmp_path, 2_000), _ready_cost(tmp_path, 20_000)
    assert large <= 2 * small + 5, (small, large)
