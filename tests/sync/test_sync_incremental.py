"""The incremental path end to end (issue 14, criterion 3): `pfsync sync`, changes of every kind at
the source, `pfsync sync` again; Medplum then holds exactly what a first sync of the changed source
makes, in both upsert modes, with the id map kept or lost (a stateless pod: state in Medplum)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sync_helpers import diff, snapshot, summary, sync_env
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

TYPES = ("Patient", "Condition", "Encounter", "Practitioner", "Organization")
runner = CliRunner()


def _sync(env: dict[str, str]) -> dict[str, Any]:
    result = runner.invoke(app, ["sync", "--json"], env=env)
    return summary(result.stdout) | {"exit": result.exit_code}


def _counts(doc: dict[str, Any], key: str) -> int:
    return sum(c.get(key, 0) for s in doc["sources"] for c in s["counts"].values())


def _all(source: SourceSandbox, rtype: str) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in source.state.store.search(source.practices[0], rtype, None, 100_000)]


def _ref_id(ref: dict[str, Any]) -> str:
    return str(ref["reference"]).split("/")[-1]


def _change_everything(source: SourceSandbox) -> None:
    """One change of each kind the issue lists, on every synced type."""
    patients = _all(source, "Patient")
    encounters = _all(source, "Encounter")
    conditions = _all(source, "Condition")
    # A plain field change.
    patient = patients[0]
    patient["gender"] = "other" if patient.get("gender") != "other" else "unknown"
    source.upsert(patient)
    # The Encounter changes a field; its Practitioner and Organization (outside the Patient
    # compartment: never in the export) change too, reachable only through the Encounter.
    enc = encounters[0]
    enc["status"] = "entered-in-error"
    source.upsert(enc)
    practitioner = next(
        p for p in _all(source, "Practitioner") if p["id"] == _ref_id(enc["participant"][0]["individual"])
    )
    practitioner["name"][0]["family"] = "Renamed"
    source.upsert(practitioner)
    organization = next(o for o in _all(source, "Organization") if o["id"] == _ref_id(enc["serviceProvider"]))
    organization["name"] = "Renamed clinic"
    source.upsert(organization)
    # A changed reference: a Condition now points at another Encounter of its patient.
    cond = next(c for c in conditions if "encounter" in c)
    other = next(e for e in encounters
                 if _ref_id(e["subject"]) == _ref_id(cond["subject"]) and e["id"] != _ref_id(cond["encounter"]))  # fmt: skip
    cond["encounter"] = {"reference": f"Encounter/{other['id']}"}
    source.upsert(cond)
    # A delete (a Condition: nothing refers to it).
    gone = next(c for c in conditions if c["id"] != cond["id"])
    source.delete("Condition", gone["id"])
    # The first sync wrote `waiting` with a logical reference (its target was not at the source);
    # the target appears now, so the next run upgrades the reference: a re-write by id.
    later = {**encounters[1], "id": "encounter-added-later", "status": "planned"}
    source.upsert(later)


def _plant_logical(source: SourceSandbox) -> None:
    """Before the first sync: an Encounter that is `partOf` one the source does not have yet."""
    enc = _all(source, "Encounter")[2]
    enc["partOf"] = {"reference": "Encounter/encounter-added-later", "display": "Follow-up"}
    source.upsert(enc)


@pytest.mark.parametrize("state", ["kept", "lost"])
@pytest.mark.parametrize("mode", ["direct", "conditional"])
def test_incremental_sync_lands_every_kind_of_change(
    source: SourceSandbox, target: TargetSandbox, target_factory: Callable[..., TargetSandbox],
    tmp_path: Path, mode: str, state: str,
) -> None:  # fmt: skip
    # "lost": a stateless pod; the checkpoint and lease live in Medplum, the id map starts empty.
    backend = {"PFSYNC_STATE_BACKEND": "medplum"} if state == "lost" else {}
    # No overlap: the second export holds only what changed (the first sync's data is seconds old).
    env = sync_env(
        source, target, tmp_path / "state", PFSYNC_UPSERT_MODE=mode, PFSYNC_SINCE_OVERLAP="0", **backend
    )
    _plant_logical(source)
    first = _sync(env)
    assert first["exit"] == 0, first
    assert _counts(first, "quarantined") == 0 and _counts(first, "created") > 0

    _change_everything(source)
    if state == "lost":
        shutil.rmtree(tmp_path / "state")
    second = _sync(env)
    assert second["exit"] == 0, second
    assert _counts(second, "quarantined") == 0 and _counts(second, "retry_queued") == 0
    assert _counts(second, "deleted") == 1
    # Only the changes were written: the added Encounter created; one update per changed resource,
    # plus the Encounter whose logical reference became literal; nothing else was offered.
    counts = second["sources"][0]["counts"]
    assert _counts(second, "created") == 1 and counts["Encounter"]["created"] == 1
    assert {t: c["updated"] for t, c in counts.items()} == {
        "Patient": 1, "Encounter": 2, "Condition": 1, "Practitioner": 1, "Organization": 1,
    }  # fmt: skip
    if state == "kept":
        assert _counts(second, "unchanged") == 0  # without the map, targets are re-read (unchanged)

    # Exactly what a first sync of the changed source makes, in another Medplum.
    fresh = target_factory()
    expected_env = sync_env(source, fresh, tmp_path / "fresh-state", PFSYNC_UPSERT_MODE=mode)
    reference = _sync(expected_env)
    assert reference["exit"] == 0, reference
    got, want = snapshot(target, TYPES), snapshot(fresh, TYPES)
    assert got == want, diff(got, want)
