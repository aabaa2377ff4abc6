"""Sync state: the versioned JSON format, atomic writes, corruption handling, the fake store."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest
from doubles import MemoryStateStore

from pfsync.core.errors import LockedError, StateError
from pfsync.core.instants import iso, parse_iso
from pfsync.core.statedir import source_dir
from pfsync.sync.holders import Holder, Lease
from pfsync.sync.state import InFlight, LastRun, LocalStateStore, SyncState, write_atomic

FULL = SyncState(
    source="practice-a",
    transaction_time="2026-01-02T03:04:05.678Z",
    last_attempt="2026-01-02T03:00:00.000Z",
    last_success="2026-01-02T03:05:00.000Z",
    last_outcome="partial",
    last_error="2 resources quarantined",
    last_run=LastRun({"Patient": {"created": 3, "updated": 1}}, 12.5, 840, 6, "2026-01-02T03:04:05.678Z"),
    in_flight=InFlight(
        "incremental",
        "exports/abc",
        "2026-01-01T00:00:00Z",
        "2026-01-02T03:00:00.000Z",
        ("aa" * 32,),
        ("g1",),
    ),
    group_members={"g1": ("p1", "p2")},
    lease=Lease("pid 1 on host", "tok", "2026-01-02T03:20:00.000Z"),
)


def test_state_round_trips_through_json() -> None:
    doc = orjson.loads(orjson.dumps(FULL.to_json()))
    assert doc["version"] == 1
    assert SyncState.from_json(doc, "x") == FULL


def test_local_store_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert LocalStateStore(tmp_path).load("a") == SyncState(source="a")


def test_local_store_saves_atomically_with_mode_0600(tmp_path: Path) -> None:
    store = LocalStateStore(tmp_path)
    store.save(FULL)
    path = tmp_path / "practice-a" / "checkpoint.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load("practice-a") == FULL
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.json"]  # no temp files left


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"version": 2, "source": "a"}', "unsupported state format version 2"),
        (b'{"version": 1}', "corrupt"),
        (b'{"version": 1, "source": "a", "transactionTime": 5}', "corrupt"),
        (b'{"version": 1, "source": "b"}', "belongs to source 'b'"),
    ],
)
def test_local_store_corrupt_file_is_state_error_and_kept(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "a" / "checkpoint.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(StateError, match=needle) as info:
        LocalStateStore(tmp_path).load("a")
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never overwritten silently


def test_write_atomic_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.json"
    write_atomic(path, b"old")

    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_local_store_unwritable_dir_is_state_error(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a file, not a directory")
    with pytest.raises(StateError, match="cannot write checkpoint"):
        LocalStateStore(tmp_path).save(SyncState(source="a"))


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_source_dir_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(StateError):
        source_dir(tmp_path, name)


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("1970-01-01T00:00:10Z", 10.0),
        ("1970-01-01T00:00:10.500+00:00", 10.5),
        ("1970-01-01T01:00:00+01:00", 0.0),
    ],
)
def test_parse_iso_reads_instants(text: str, epoch: float) -> None:
    assert parse_iso(text) == epoch


def test_iso_round_trips() -> None:
    assert iso(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert parse_iso(iso(1_700_000_000.25)) == 1_700_000_000.25


def test_parse_iso_rejects_garbage() -> None:
    with pytest.raises(StateError):
        parse_iso("yesterday")


def test_memory_store_lock_refuses_second_holder() -> None:
    store = MemoryStateStore()
    lock = store.acquire("a", Holder(1, "h", "t"))
    with pytest.raises(LockedError, match="pid 1 on h"):
        store.acquire("a", Holder(2, "h", "t"))
    lock.release()
    store.acquire("a", Holder(2, "h", "t")).release()
