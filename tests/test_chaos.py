"""Chaos: `pfsync sync` SIGKILLed at seeded points across export, download, load and checkpoint, with
sandbox restarts and source changes/deletions between runs, loses nothing and duplicates nothing.

CI runs the reduced size (about 1,600 resources, 20 kill points). PFSYNC_SLOW=1 adds the full size
(several thousand resources, 40 kill points). Kill points are chosen from a seeded RNG, either as a
time within a clean run's measured duration or as an observed event (the n-th kick-off, status
poll, file download or target write, or the checkpoint write), so every phase is hit; the seed is in
the test id, and the failure message lists every run, so a failure can be replayed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos_helpers import Rig, RunOutcome, compare, mutate_source, plan_kill_points, queue_lines, run_sync

from pfsync.sandbox.source.datagen import generate


def _chaos(
    tmp_path: Path, rig_factory: Callable[[Path, Path], Rig], *, patients: int, kills: int, seed: int
) -> None:
    rng = random.Random(seed)
    data = tmp_path / "data"
    generate(data, patients, seed=seed)
    rig = rig_factory(tmp_path, data)
    history: list[RunOutcome] = []

    def describe() -> str:
        lines = [f"seed={seed} patients={patients} restarts={rig.restarts}"]
        for h in history:
            lines.append(f"  {h.label:16} rc={h.returncode:4} killed={h.killed} {h.elapsed:.2f}s")
        bad = [h for h in history if not h.killed and h.returncode != 0]
        if bad:
            lines.append("stderr of the last failed run:\n" + bad[-1].stderr_tail)
        return "\n".join(lines)

    try:
        # Calibrate on a clean run, then wipe the target and pfsync's state: the chaos starts empty.
        clean = run_sync(rig)
        history.append(clean)
        assert clean.returncode == 0, describe()
        last = clean.work
        calibration = compare(rig)
        assert not calibration.loss_problems(), (
            f"a clean run already differs: {calibration.problems()}\n{describe()}"
        )
        if calibration.logical_to_loaded:
            print(f"after one clean sync, {len(calibration.logical_to_loaded)} logical references point at "
                  f"loaded resources, e.g. {calibration.logical_to_loaded[:2]}")  # fmt: skip
        rig.sandboxes.target.reset()
        import shutil

        shutil.rmtree(rig.state_dir)

        changes: Counter[str] = Counter()
        for i, point in enumerate(plan_kill_points(rng, kills)):
            if point.mutate_before or (history and not history[-1].killed):
                # a run that finished leaves nothing to do: change the source so the next one works
                changes += mutate_source(rig, rng, f"k{i}")
            outcome = run_sync(rig, point, last)
            history.append(outcome)
            if not outcome.killed:
                assert outcome.returncode == 0, describe()
                last = outcome.work
            if point.restart_after:
                rig.restart()

        # Rerun until success (a clean run must succeed at once; allow a second for queued retries).
        for _ in range(3):
            final = run_sync(rig)
            history.append(final)
            if final.returncode == 0:
                break
        assert history[-1].returncode == 0, describe()
        # And once more with a last round of source changes, so deletions of the end are seen too.
        changes += mutate_source(rig, rng, "final")
        closing = run_sync(rig)
        history.append(closing)
        assert closing.returncode == 0, describe()

        result = compare(rig)
        killed = Counter(h.label.split(":")[0] for h in history if h.killed)
        assert sum(killed.values()) >= kills // 2, f"too few runs were actually killed\n{describe()}"
        assert result.ok, f"{result.problems()}\nchanges={dict(changes)}\n{describe()}"
        assert result.found == result.expected
        assert not queue_lines(rig, "retry.ndjson"), describe()
        assert not queue_lines(rig, "quarantine.ndjson"), describe()
        assert changes["deleted"] > 0 and changes["changed"] > 0 and changes["added"] > 0
        print(f"chaos ok: {result.found} resources, kills by phase={dict(killed)}, changes={dict(changes)}")
        print(describe())
    finally:
        rig.stop()


@pytest.mark.parametrize("seed", [20251125])
def test_chaos_sync_killed_at_random_points_loses_nothing(
    tmp_path: Path, rig_factory: Callable[[Path, Path], Rig], seed: int
) -> None:
    _chaos(tmp_path, rig_factory, patients=15, kills=20, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, 1234])
def test_chaos_sync_full_size_loses_nothing(
    tmp_path: Path, rig_factory: Callable[[Path, Path], Rig], seed: int
) -> None:
    _chaos(tmp_path, rig_factory, patients=60, kills=40, seed=seed)
