"""Real `pfsync sync`/`status` processes against both sandboxes: concurrent runs, group backfill, status.

Concurrency is made deterministic with SIGSTOP: the first run is frozen while it holds the lock
(or the Medplum lease), the second must be refused naming it, then the first is let go and must
finish normally.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sync_helpers import checkpoint, kill, run, spawn, summary, sync_env, wait_until
from target_fixtures import medplum_of

from pfsync.core.errors import LockedError
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.sync.holders import Holder
from pfsync.sync.lock import FileLock
from pfsync.sync.state_medplum import MedplumStateStore

GROUP = "bulk-data-testing-group"
PF_PATIENT = "https://practicefusion.com/fhir/patient-id"


def _medplum_store(target: TargetSandbox, **kw: Any) -> MedplumStateStore:
    clock = kw.pop("clock", None)
    client = httpx.Client(auth=("pfsync-target", "target-secret"))
    return MedplumStateStore(medplum_of(client, fhir_url=target.fhir_url, clock=clock), **kw)


@pytest.mark.parametrize("backend", ["local", "medplum"])
def test_sync_concurrent_runs_second_refused_exit_8_naming_holder(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, backend: str
) -> None:
    env = sync_env(source, target, tmp_path / "state", PFSYNC_STATE_BACKEND=backend)
    if backend == "local":
        holder: Callable[[], Holder | None] = lambda: FileLock.holder(tmp_path / "state" / "pf" / "lock")  # noqa: E731
    else:
        store = _medplum_store(target)
        holder = lambda: store.holder("pf")  # noqa: E731
    first = spawn(env, "sync", "--json")
    try:
        assert wait_until(lambda: holder() is not None, first), "the first run never took the lock"
        first.send_signal(signal.SIGSTOP)  # frozen while holding it
        code, out, err = run(env, "sync", "--json")
        first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=60)
    finally:
        kill(first, signal.SIGCONT)
        kill(first)
    assert code == 8, err[-2000:]
    refused = summary(out)["sources"][0]
    assert refused["outcome"] == "locked" and f"pid {first.pid} on " in refused["error"]
    assert first.returncode == 0, first_err.decode()[-2000:]
    assert summary(first_out.decode())["sources"][0]["outcome"] == "ok"


def test_medplum_lease_creation_race_has_one_winner(target: TargetSandbox) -> None:
    """Both pods find no state and create it at once: the state record is created with
    If-None-Exist (docs/medplum.md, recorded case 49), so the second create is answered with the
    first one's record; that pod looks at it, sees the live lease and stops before any work; only the first goes on."""
    a, b = _medplum_store(target), _medplum_store(target)
    fetch = a._fetch
    raced = threading.Event()

    def racing_fetch(source: str) -> Any:
        res, state = fetch(source)
        if not raced.is_set():
            raced.set()
            b_lock = b.acquire(source, Holder(2, "pod-b", "t"))  # b gets in between a's read and create
            b.save(b.load(source))
            b_held.append(b_lock)
        return res, state

    b_held: list[Any] = []
    a._fetch = racing_fetch  # type: ignore[method-assign]
    with pytest.raises(LockedError, match="pod-b"):
        a.acquire("pf", Holder(1, "pod-a", "t"))  # its create found b's record: b holds the lease
    a._fetch = fetch  # type: ignore[method-assign]
    b.save(b.load("pf"))  # the winner goes on
    assert a.holder("pf") is not None and "pod-b" in a.holder("pf").describe()  # type: ignore[union-attr]
    assert len(target.resources("Basic")) == 1
    b_held[0].release()


def test_sync_medplum_lease_renewed_during_one_long_load(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """A lease shorter than one file's load stays ours: the timer renews it while the file loads."""
    from pfsync.core.settings import load_settings
    from pfsync.sync.live import LiveEngines
    from pfsync.sync.run import sync_source

    settings = load_settings(env=sync_env(source, target, tmp_path / "state", PF_RESOURCE_TYPES="Patient"))
    store = _medplum_store(target, lease_ttl=0.6)  # renewed every 0.2 s
    other = _medplum_store(target)
    refused: list[str] = []

    class SlowEngines(LiveEngines):
        def loader(self) -> Any:
            inner = super().loader()

            class Slow:
                def __enter__(self) -> Any:
                    loader = inner.__enter__()
                    original = loader.load_file

                    def load_file(path: Path) -> None:
                        # Outlast the 0.6 s TTL three times over, asking the other pod each time.
                        for _ in range(12):
                            threading.Event().wait(0.15)
                            try:
                                other.acquire("pf", Holder(9, "pod-other", "t")).release()
                                refused.append("TAKEN")
                            except LockedError:
                                refused.append("refused")
                        original(path)

                    loader.load_file = load_file  # type: ignore[method-assign]  # slows this one loader down
                    return loader

                def __exit__(self, *exc: Any) -> Any:
                    return inner.__exit__(*exc)

            return Slow()

    engines = SlowEngines(settings, settings.sources[0], threading.Event())
    result = sync_source(settings, settings.sources[0], store, lambda: engines, stop=threading.Event())
    assert result.exit_code == 0, result.error
    assert refused and set(refused) == {"refused"}


def test_sync_group_backfill_new_member_history_lands(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    env = sync_env(source, target, tmp_path / "state", PFSYNC_EXPORT_LEVEL="group", PFSYNC_GROUPS=GROUP)
    code, out, err = run(env, "sync", "--json")
    assert code == 0, err[-2000:]
    members = set(checkpoint(tmp_path / "state")["groupMembers"][GROUP])
    assert len(target.resources("Patient")) == len(members) == 9  # docs/practice-fusion.md: 9 patients
    newcomer = sorted(set(source.state.store.patient_ids(source.practices[0])) - members)[0]
    history = [
        orjson.loads(raw)
        for raw in source.state.store.search(source.practices[0], "Encounter", None, 100_000)
        if orjson.loads(raw)["subject"]["reference"] == f"Patient/{newcomer}"
    ]
    assert history, "the newcomer needs encounters for this test"
    source.add_to_group(GROUP, [newcomer])  # their resources predate the checkpoint

    code, out, err = run(env, "sync", "--json")
    assert code == 0, err[-2000:]
    (patient,) = target.find_by_identifier("Patient", PF_PATIENT, newcomer)
    landed = [
        e for e in target.resources("Encounter") if e["subject"]["reference"] == f"Patient/{patient['id']}"
    ]
    assert len(landed) == len(history)
    counts = summary(out)["sources"][0]["counts"]
    assert counts["Encounter"]["created"] == len(history)
    assert newcomer in checkpoint(tmp_path / "state")["groupMembers"][GROUP]


def test_status_after_real_syncs_healthy_failed_corrupt(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    env = sync_env(source, target, state_dir, PF_RESOURCE_TYPES="Patient")
    assert run(env, "sync", "--json")[0] == 0
    code, out, _ = run(env, "status")  # stdout is a pipe: one JSON object (README "Output")
    assert code == 0, out
    (line,) = out.splitlines()
    row = orjson.loads(line)["sources"][0]
    assert row["source"] == "pf" and row["healthy"] is True and row["lastOutcome"] == "ok"
    code, out, _ = run(env, "status", "--json")
    doc = orjson.loads(out)
    assert code == 0 and doc["healthy"] is True
    patients = doc["sources"][0]["counts"]["Patient"]["created"]
    assert patients > 0 and doc["sources"][0]["totals"]["Patient"]["created"] == patients

    code, _, _ = run({**env, "PF_CLIENT_SECRET": "wrong-secret"}, "sync", "--json")
    assert code == 4
    code, out, _ = run(env, "status", "--json")
    st = orjson.loads(out)["sources"][0]
    assert code == 9 and not st["healthy"] and any("last run failed" in r for r in st["reasons"])

    (state_dir / "pf" / "checkpoint.json").write_text('{"version": 1, "source": ')
    code, out, err = run(env, "status", "--json")
    assert code == 7 and "corrupt" in (out + err)
