"""sync orchestration with fake engines: checkpoint rules, resume, interruption, groups, many sources."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from doubles import MemoryStateStore

from pfsync.core.errors import ConfigError, ExitCode, ExportError
from pfsync.core.settings import Settings, SourceSettings, SyncSettings
from pfsync.source.bulk import ExportRequest
from pfsync.source.exportjob import LandedFile
from pfsync.sync.holders import Holder
from pfsync.sync.results import SEVERITY, worst_exit_code
from pfsync.sync.run import sync_all, sync_source
from pfsync.sync.sources import parse_shard, select_sources, shard_of
from pfsync.sync.state import SyncState

TT1, TT2 = "2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z"


@dataclass
class FakeLoader:
    log: list[str]
    counts: dict[str, dict[str, int]]
    fail_on: str | None = None
    stop_on: str | None = None
    stop: threading.Event | None = None

    def retry_pending(self) -> None:
        self.log.append("retry")

    def load_file(self, path: Path) -> None:
        if path.name == self.fail_on:
            raise RuntimeError("killed")
        if path.name == self.stop_on and self.stop is not None:
            self.stop.set()
        self.log.append(f"load {path.name}")

    def apply_deleted(self, path: Path) -> None:
        self.log.append(f"delete {path.name}")

    def expect_types(self, types: Iterable[str] | None) -> None:
        return None

    def refresh_referenced(self, delivered: Iterable[str] | None, last_whole: str | None = None) -> None:
        return None

    def flush(self) -> None:
        return None

    def mark_loaded(self, key: str) -> None:
        return None  # every file of a resumed run is offered again

    def is_loaded(self, key: str) -> bool:
        return False

    @property
    def referenced_refreshed_at(self) -> float | None:
        return None

    def finish(self) -> FakeSummary:
        return FakeSummary(self.counts, quota_used=7)


@dataclass(frozen=True)
class FakeSummary:
    by_type: dict[str, dict[str, int]]
    quota_used: int


@dataclass
class FakeEngines:
    files: list[tuple[str, str]] = field(default_factory=lambda: [("output", "Patient.1"), ("deleted", "del.1"),
                                                                  ("output", "Obs.1")])  # fmt: skip
    tt: str = TT1
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: {"Patient": {"created": 2}})
    members: dict[str, frozenset[str]] = field(default_factory=dict)
    seed: str | None = None
    fail_on: str | None = None
    stop_on: str | None = None
    export_error: Exception | None = None
    stop: threading.Event | None = None
    log: list[str] = field(default_factory=list)
    proved: int = 0
    requests: list[tuple[ExportRequest, Path]] = field(default_factory=list)

    def run_export(self, request: ExportRequest, out_dir: Path, on_file: Callable[[LandedFile], None]) -> str:
        self.requests.append((request, out_dir))
        if self.export_error:
            raise self.export_error
        for kind, name in self.files:
            on_file(LandedFile(type=name.split(".")[0], path=out_dir / name, sha256=f"{out_dir.name}-{name}",
                               lines=1, kind=kind))  # type: ignore[arg-type]  # fmt: skip
        return self.tt

    @contextmanager
    def _loader(self) -> Iterator[FakeLoader]:
        yield FakeLoader(self.log, self.counts, self.fail_on, self.stop_on, self.stop)

    def loader(self) -> Any:
        return self._loader()

    def group_members(self, group_id: str, scratch: Path) -> frozenset[str]:
        return self.members.get(group_id, frozenset())

    def seed_checkpoint(self) -> str | None:
        return self.seed

    def prove_credentials(self) -> None:
        self.proved += 1

    def close(self) -> None:
        return None


def _settings(tmp_path: Path, *sources: SourceSettings, **sync: Any) -> Settings:
    srcs = sources or (SourceSettings(name="a", base_url="http://127.0.0.1:1/fhir"),)
    return Settings(sources=srcs, state_dir=tmp_path, sync=SyncSettings(**sync))


def _run(
    settings: Settings, store: MemoryStateStore, engines: FakeEngines, stop: threading.Event | None = None
) -> Any:
    return sync_source(settings, settings.sources[0], store, lambda: engines, stop=stop or threading.Event())


def test_sync_first_run_is_full_then_incremental_with_overlap(tmp_path: Path) -> None:
    settings, store, engines = _settings(tmp_path), MemoryStateStore(), FakeEngines()
    result = _run(settings, store, engines)
    assert (result.outcome, result.exit_code, result.checkpoint_advanced) == ("ok", 0, True)
    assert engines.requests[0][0].since is None
    # retry queue first; deleted files after every output file
    assert engines.log == ["retry", "load Patient.1", "load Obs.1", "delete del.1"]
    assert engines.proved == 1  # every run proves its credentials, before any work
    state = store.load("a")
    assert state.transaction_time == TT1 and state.in_flight is None and state.last_success
    engines2 = FakeEngines(tt=TT2)
    _run(settings, store, engines2)
    assert engines2.requests[0][0].since == "2025-12-31T23:55:00.000Z"  # TT1 minus 300 s overlap
    assert store.load("a").transaction_time == TT2


def test_sync_retry_queued_keeps_checkpoint(tmp_path: Path) -> None:
    store = MemoryStateStore()
    store.save(SyncState(source="a", transaction_time=TT1))
    result = _run(_settings(tmp_path), store, FakeEngines(tt=TT2, counts={"Patient": {"retry_queued": 3}}))
    assert (result.outcome, result.exit_code, result.checkpoint_advanced) == (
        "failed",
        ExitCode.TEMPORARY,
        False,
    )
    state = store.load("a")
    assert state.transaction_time == TT1 and state.in_flight is None
    assert "retry queue" in (state.last_error or "")


def test_sync_quarantine_is_partial_but_advances(tmp_path: Path) -> None:
    store = MemoryStateStore()
    result = _run(
        _settings(tmp_path), store, FakeEngines(counts={"Patient": {"created": 1, "quarantined": 2}})
    )
    assert (result.outcome, result.exit_code) == ("partial", ExitCode.PARTIAL)
    assert store.load("a").transaction_time == TT1


def test_sync_crash_resumes_same_export_and_offers_every_file_again(tmp_path: Path) -> None:
    """A file the loader returned from may still have resources buffered for the next Bundle, so a
    resumed run offers it again (the loader's content hashes make that free), never skips it."""
    settings, store = _settings(tmp_path), MemoryStateStore()
    crashed = FakeEngines(fail_on="Obs.1")
    result = _run(settings, store, crashed)
    assert result.exit_code == ExitCode.UNEXPECTED
    assert store.load("a").in_flight is not None
    resumed = FakeEngines()
    assert _run(settings, store, resumed).exit_code == 0
    assert resumed.requests[0][1] == crashed.requests[0][1]  # same export directory: the same job
    assert resumed.log == ["retry", "load Patient.1", "load Obs.1", "delete del.1"]
    assert store.load("a").transaction_time == TT1


def test_sync_stop_event_interrupts_resumably(tmp_path: Path) -> None:
    settings, store, stop = _settings(tmp_path), MemoryStateStore(), threading.Event()
    result = _run(settings, store, FakeEngines(stop_on="Patient.1", stop=stop), stop)
    assert (result.outcome, result.exit_code) == ("interrupted", ExitCode.INTERRUPTED)
    state = store.load("a")
    assert state.in_flight is not None and state.transaction_time is None
    assert state.last_outcome == "interrupted"


def test_sync_refused_export_drops_in_flight(tmp_path: Path) -> None:
    store = MemoryStateStore()
    result = _run(_settings(tmp_path), store, FakeEngines(export_error=ExportError("refused")))
    assert result.exit_code == ExitCode.EXPORT_FAILED
    assert store.load("a").in_flight is None


def test_sync_locked_source_is_exit_8(tmp_path: Path) -> None:
    store = MemoryStateStore()
    store.acquire("a", Holder(9, "elsewhere", "t"))
    result = _run(_settings(tmp_path), store, FakeEngines())
    assert (result.outcome, result.exit_code) == ("locked", ExitCode.LOCKED)
    assert "pid 9 on elsewhere" in (result.error or "")


def test_sync_adopts_seed_checkpoint_when_opted_in(tmp_path: Path) -> None:
    store, engines = MemoryStateStore(), FakeEngines(seed="2025-06-01T00:00:00Z")
    _run(_settings(tmp_path, adopt_seed_checkpoint=True), store, engines)
    assert engines.requests[0][0].since == "2025-05-31T23:55:00.000Z"
    engines2 = FakeEngines(seed="2025-06-01T00:00:00Z")
    _run(_settings(tmp_path / "other"), MemoryStateStore(), engines2)
    assert engines2.requests[0][0].since is None  # not opted in: full


def test_sync_group_new_members_get_backfill_without_since(tmp_path: Path) -> None:
    src = SourceSettings(name="a", base_url="http://127.0.0.1:1/fhir", groups=("g1", "g2"))
    settings, store = _settings(tmp_path, src), MemoryStateStore()
    members = {"g1": frozenset({"p1"}), "g2": frozenset({"p2"})}
    _run(settings, store, FakeEngines(members=members))
    assert store.load("a").group_members == {"g1": ("p1",), "g2": ("p2",)}
    engines = FakeEngines(tt=TT2, members={**members, "g1": frozenset({"p1", "p3"})})
    _run(settings, store, engines)
    reqs = [r for r, _ in engines.requests]
    assert [(r.group_id, r.since is None) for r in reqs] == [("g1", False), ("g2", False), ("g1", True)]
    assert store.load("a").group_members["g1"] == ("p1", "p3")


@pytest.mark.parametrize(
    ("codes", "worst"),
    [
        ([], 0),
        ([0, 6], 6),
        ([0, 8, 6], 8),
        ([6, 75, 8], 75),
        ([75, 5], 5),
        ([5, 4], 4),
        ([3, 4, 130], 130),
        ([0, 42], 42),  # unknown codes rank just after "unexpected"
    ],
)
def test_worst_exit_code_orders_outcomes(codes: list[int], worst: int) -> None:
    assert worst_exit_code(codes) == worst
    assert SEVERITY[0] == ExitCode.INTERRUPTED and SEVERITY[-1] == ExitCode.OK


def test_sync_all_three_sources_one_failing_runs_all(tmp_path: Path) -> None:
    sources = tuple(SourceSettings(name=n, base_url="http://127.0.0.1:1/fhir") for n in ("a", "b", "c"))
    settings, store = _settings(tmp_path, *sources, parallel_sources=2), MemoryStateStore()

    def make(src: SourceSettings, stop: threading.Event) -> FakeEngines:
        return FakeEngines(export_error=ExportError("refused") if src.name == "b" else None)

    result = sync_all(settings, sources, store, make, stop=threading.Event())
    assert [(r.source, r.exit_code) for r in result.results] == [("a", 0), ("b", 5), ("c", 0)]
    assert result.exit_code == ExitCode.EXPORT_FAILED
    assert store.load("c").transaction_time == TT1


def test_sync_all_disabled_does_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path, enabled=False)
    result = sync_all(
        settings, settings.sources, MemoryStateStore(), lambda s, e: FakeEngines(), stop=threading.Event()
    )
    assert result.results == () and result.exit_code == 0


def test_sync_all_skips_disabled_source(tmp_path: Path) -> None:
    src = SourceSettings(name="a", base_url="http://127.0.0.1:1/fhir", enabled=False)
    settings = _settings(tmp_path, src)
    result = sync_all(
        settings, settings.sources, MemoryStateStore(), lambda s, e: FakeEngines(), stop=threading.Event()
    )
    assert [r.outcome for r in result.results] == ["skipped"]


def test_shards_partition_sources_stably(tmp_path: Path) -> None:
    names = [f"practice-{i}" for i in range(50)]
    sources = tuple(SourceSettings(name=n, base_url="http://127.0.0.1:1/fhir") for n in names)
    settings = _settings(tmp_path, *sources)
    picked = [[s.name for s in select_sources(settings, shard=f"{i}/4")] for i in range(4)]
    assert sorted(n for p in picked for n in p) == sorted(names)  # every source in exactly one shard
    assert all(picked)  # sha256 spreads 50 names over 4 shards
    assert (
        shard_of("practice-1", 4)
        == int.from_bytes(__import__("hashlib").sha256(b"practice-1").digest()[:8], "big") % 4
    )


@pytest.mark.parametrize("text", ["4/4", "x/2", "1", "-1/3", "0/0"])
def test_parse_shard_rejects_bad_values(text: str) -> None:
    from pfsync.core.errors import UsageError

    with pytest.raises(UsageError):
        parse_shard(text)


def test_sync_all_locked_source_never_builds_engines(tmp_path: Path) -> None:
    """Lock first: a source another run holds reports locked (8), even if its engines would fail to build."""
    settings, store = _settings(tmp_path), MemoryStateStore()
    store.acquire("a", Holder(9, "elsewhere", "t"))
    built: list[str] = []

    def make(src: SourceSettings, stop: threading.Event) -> FakeEngines:
        built.append(src.name)
        raise ConfigError("bad private key file")

    result = sync_all(settings, settings.sources, store, make, stop=threading.Event())
    assert [(r.outcome, r.exit_code) for r in result.results] == [("locked", ExitCode.LOCKED)]
    assert built == []


def test_sync_all_engine_build_failure_is_recorded_in_state(tmp_path: Path) -> None:
    settings, store = _settings(tmp_path), MemoryStateStore()

    def make(src: SourceSettings, stop: threading.Event) -> FakeEngines:
        raise ConfigError("bad private key file")

    result = sync_all(settings, settings.sources, store, make, stop=threading.Event())
    assert result.exit_code == ExitCode.CONFIG
    state = store.load("a")
    assert (state.last_outcome, state.last_error) == ("failed", "bad private key file")
    assert store.held == {}  # the lock is released


def test_sync_renews_lease_on_a_timer_during_one_long_file(tmp_path: Path) -> None:
    """One file that outlasts the lease must not lose it: renewal runs on a timer, not per file."""
    store = MemoryStateStore(renew_every=0.01)
    engines = FakeEngines(files=[("output", "Huge.1")])
    seen: list[int] = []

    class SlowLoader(FakeLoader):
        def load_file(self, path: Path) -> None:
            for _ in range(2000):  # bounded wait for three renewals while this one file "loads"
                if store.renewals >= 3:
                    break
                threading.Event().wait(0.005)
            seen.append(store.renewals)
            super().load_file(path)

    @contextmanager
    def slow() -> Iterator[FakeLoader]:
        yield SlowLoader(engines.log, engines.counts)

    engines.loader = slow  # type: ignore[method-assign]
    result = _run(_settings(tmp_path), store, engines)
    assert result.exit_code == 0
    assert seen and seen[0] >= 3
    after = store.renewals
    threading.Event().wait(0.05)
    assert store.renewals == after  # the timer stops with the run


def test_sync_totals_accumulate_across_runs(tmp_path: Path) -> None:
    settings, store = _settings(tmp_path), MemoryStateStore()
    _run(settings, store, FakeEngines())
    _run(settings, store, FakeEngines(tt=TT2))
    state = store.load("a")
    assert state.totals["Patient"]["created"] == 4  # two runs of 2: a counter, never reset
    assert state.last_run is not None and state.last_run.counts["Patient"]["created"] == 2
