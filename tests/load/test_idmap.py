"""pfsync.load.idmap: the SQLite id map and binaries (held resources: test_holds.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pfsync.load import idmap as idmap_module
from pfsync.load.idmap import IdMap, MapRow


def test_idmap_record_get_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "s" / "idmap.sqlite"
    m = IdMap(path, target="http://a/fhir/R4/")
    assert m.cold
    m.seen("Patient", "p1")
    assert m.get("Patient", "p1") == MapRow(None, None, None)
    m.record("Patient", "p1", "mid-1", "v1", "h1")
    m.close()
    m = IdMap(path, target="http://a/fhir/R4/")
    assert not m.cold
    assert m.get("Patient", "p1") == MapRow("mid-1", "v1", "h1")
    assert m.counts() == {"Patient": 1}
    m.close()


def test_idmap_types_of_resolves_by_id_alone(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    m.seen("Encounter", "u1")
    assert m.types_of("u1") == [("Encounter", None)]
    m.record("Encounter", "u1", "m", None, None)
    assert m.types_of("u1") == [("Encounter", "m")]
    assert m.types_of("nope") == []
    m.close()


def test_idmap_forget_keeps_identity_known(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    m.record("Patient", "p", "m", "v", "h")
    m.forget("Patient", "p")
    assert m.get("Patient", "p") == MapRow(None, None, None)
    m.close()


def test_idmap_other_target_starts_cold(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    m = IdMap(path, target="http://a/")
    m.record("Patient", "p", "m", "v", "h")
    m.record_binary("sha", "b1", 3)
    m.close()
    m = IdMap(path, target="http://b/")
    assert m.cold
    assert m.get("Patient", "p") is None and m.binary("sha") is None
    m.close()


def test_idmap_binaries(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t")
    assert m.binary("abc=") is None
    m.record_binary("abc=", "bin-1", 10)
    assert m.binary("abc=") == "bin-1"
    m.close()


def test_idmap_noted_identities_stay_in_memory_until_the_map_outgrows_it(tmp_path: Path) -> None:
    seen_cost = idmap_module._cost(("Encounter", "u1"), MapRow(None, None, None))
    loaded_cost = idmap_module._cost(("Patient", "p1"), MapRow("m-p1", None, None))
    path = tmp_path / "i.sqlite"
    m = IdMap(path, target="t", cache_bytes=2 * seen_cost + loaded_cost)  # three rows fit
    m.seen("Encounter", "u1")
    m.commit()
    assert _rows_on_disk(path) == 0  # nothing to write yet: the whole map is in memory
    m.seen("Encounter", "u2")
    m.record("Patient", "p1", "m-p1", None, None)
    m.seen("Encounter", "u3")  # the fourth identity: the map no longer fits, everything goes to disk
    m.commit()
    assert _rows_on_disk(path) == 4
    assert m.types_of("u1") == [("Encounter", None)] and m.types_of("u3") == [("Encounter", None)]
    assert m.get("Patient", "p1") == MapRow("m-p1", None, None)
    m.close()


def _rows_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM map").fetchone()[0])


def _fill(m: IdMap, start: int, n: int) -> None:
    for i in range(start, start + n):
        sid = f"{i:08d}-0000-4000-8000-000000000000"
        m.seen("Observation", sid)
        m.record("Observation", sid, f"m{sid}", f"v{sid}", f"{i:032x}")
        if i % 1000 == 999:
            m.commit()


def test_idmap_memory_stays_within_its_byte_budget_whatever_the_number_of_identities(tmp_path: Path) -> None:
    """Issue 19: what the map holds in memory is bounded by load.idmap_cache_bytes, not by the
    size of the practice; measured in this process (tracemalloc), never timed."""
    import tracemalloc

    budget = 512 * 1024
    m = IdMap(tmp_path / "i.sqlite", target="t", cache_bytes=budget)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        _fill(m, 0, 5_000)  # ~3.2 MB of rows at ~650 bytes each: past the budget
        after_5k = tracemalloc.get_traced_memory()[0] - base
        assert m.cache_bytes <= budget
        _fill(m, 5_000, 10_000)
        after_15k = tracemalloc.get_traced_memory()[0] - base
        assert m.cache_bytes <= budget
    finally:
        tracemalloc.stop()
    # The estimate is close to what CPython really holds, and three times the identities hold no
    # more memory: flat (the slack is the write buffers and the dict's free slots).
    assert after_5k < 2 * budget, after_5k
    assert after_15k < 2 * budget, after_15k
    # Every identity is still found: the ones dropped from memory come from disk.
    for i in (0, 5_000, 14_999):
        sid = f"{i:08d}-0000-4000-8000-000000000000"
        assert m.get("Observation", sid) == MapRow(f"m{sid}", f"v{sid}", f"{i:032x}")
        assert m.types_of(sid) == [("Observation", f"m{sid}")]
    assert m.get("Observation", "never-seen") is None
    m.close()
    reopened = IdMap(tmp_path / "i.sqlite", target="t", cache_bytes=budget)
    assert reopened.cache_bytes <= budget  # a large map is read only as far as the budget goes
    assert reopened.get("Observation", "00000001-0000-4000-8000-000000000000") is not None
    reopened.close()


def test_idmap_whole_map_in_memory_when_it_fits(tmp_path: Path) -> None:
    m = IdMap(tmp_path / "i.sqlite", target="t", cache_bytes=64 * 1024 * 1024)
    _fill(m, 0, 2_000)
    m.close()
    reopened = IdMap(tmp_path / "i.sqlite", target="t", cache_bytes=64 * 1024 * 1024)
    assert reopened._complete  # a miss is then definitive, without a read
    reopened.close()


def test_idmap_sqlite_memory_is_bounded_by_its_setting_whatever_the_build(tmp_path: Path) -> None:
    """Issue 19: SQLite's share of memory comes from load.idmap_sqlite_cache_bytes, TEMP tables go
    to a file and no page is memory-mapped."""
    m = IdMap(tmp_path / "i.sqlite", target="t", sqlite_cache_bytes=4 * 1024 * 1024)
    pragma = {p: m._db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("main.cache_size", "temp.cache_size",
                                                                       "temp_store", "mmap_size")}  # fmt: skip
    assert pragma == {"main.cache_size": -3072, "temp.cache_size": -1024, "temp_store": 1, "mmap_size": 0}
    m.close()


def test_idmap_types_of_sees_buffered_rows_without_writing_them(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    cost = idmap_module._cost(("Encounter", "u00"), MapRow("m-u00", None, None))
    m = IdMap(path, target="t", cache_bytes=20 * cost)
    for i in range(30):  # past the budget: the cache keeps half, the rest answers from disk
        m.seen("Encounter", f"u{i:02d}")
    m.commit()
    m.seen("Patient", "p1")
    m.record("Encounter", "u00", "m-u00", None, None)
    assert m.types_of("u00") == [("Encounter", "m-u00")] and m.types_of("p1") == [("Patient", None)]
    # Answered from the buffers, not by writing them first (this connection sees its own writes).
    assert m._db.execute("SELECT count(*), count(mid) FROM map").fetchone() == (30, 0)
    m.close()
    assert _rows_on_disk(path) == 31
