"""`pfsync verify` right after `pfsync sync` (issue 16, criteria 3 and 4), over real HTTP.

The sync fetches the Practitioners and Organizations the patient-level export leaves out: verify
counts them as the source's, `--fix-extras` never deletes what another resource refers to, and
`--dry-run` lists exactly the actions `--fix` then takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from sync_helpers import PF_SYSTEM, sync_env
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.marks import OWNER_TAG_SYSTEM
from pfsync.load.idmap import fetched_identities
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

runner = CliRunner()


def _verify(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["verify", "--json", *args], env=env)
    assert result.stdout.startswith("{"), result.output
    return result.exit_code, orjson.loads(result.stdout)


def _actions(doc: dict[str, Any]) -> list[tuple[str, str, str | None, str | None]]:
    return sorted((a["kind"], a["type"], a.get("sid"), a.get("mid")) for a in doc["actions"])


def test_bare_verify_after_sync_counts_fetched_resources_and_keeps_referenced_extras(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = sync_env(source, target, state)
    synced = runner.invoke(app, ["sync", "--json"], env=env)
    assert synced.exit_code == 0, synced.output
    fetched = list(fetched_identities(state / "pf" / "idmap.sqlite"))
    assert {t for t, _ in fetched} >= {"Practitioner"}

    # Right after the sync (which deleted its exports): a fresh full export, no extras.
    code, doc = _verify(env)
    assert code == 0, doc
    assert doc["total"]["extra"] == 0 and doc["extrasChecked"] is True
    assert doc["types"]["Practitioner"]["present"] >= len([1 for t, _ in fetched if t == "Practitioner"])
    assert any("fetched by reference" in note for note in doc["notes"])
    assert len(list((state / "pf" / "exports").glob("verify-*"))) == 1

    # A patient the source no longer has (its Encounters still refer to it in Medplum), and a
    # planted copy nothing refers to.
    gone_id = next(iter(source.state.store.patient_ids(source.practices[0])))
    source.delete("Patient", gone_id)
    form = {
        "grant_type": "client_credentials",
        "client_id": "pfsync-target",
        "client_secret": "target-secret",
    }
    token = httpx.post(target.base_url + "oauth2/token", data=form).json()["access_token"]
    planted = {"resourceType": "Patient", "identifier": [{"system": PF_SYSTEM + "patient-id", "value": "planted"}],
               "meta": {"tag": [{"system": OWNER_TAG_SYSTEM, "code": "pf"}]}}  # fmt: skip
    made = httpx.post(target.fhir_url + "Patient", json=planted, headers={"Authorization": f"Bearer {token}"})
    assert made.status_code == 201, made.text
    (kept,) = target.find_by_identifier("Patient", PF_SYSTEM + "patient-id", gone_id)
    # Another writer's resource carrying our identifier (no owner mark): never ours to delete.
    stranger = {
        **planted,
        "identifier": [{"system": PF_SYSTEM + "patient-id", "value": "stranger"}],
        "meta": {},
    }
    assert httpx.post(
        target.fhir_url + "Patient", json=stranger, headers={"Authorization": f"Bearer {token}"}
    ).is_success

    code, plan = _verify(env, "--export", "--fix", "--fix-extras", "--dry-run")
    planned = _actions(plan)
    assert ("keep_extra", "Patient", gone_id, kept["id"]) in planned
    assert ("delete_extra", "Patient", "planted", made.json()["id"]) in planned
    assert not [a for a in plan["actions"] if a["reason"] == "referenced a deleted copy"]
    assert not [a for a in plan["actions"] if a.get("sid") == "stranger"]
    assert any("not this source's" in note for note in plan["notes"])
    assert target.find_by_identifier("Patient", PF_SYSTEM + "patient-id", "planted")  # dry run: untouched

    # Bare verify now uses that export (newer than the last sync): --fix does exactly the plan.
    code, fixed = _verify(env, "--fix", "--fix-extras")
    assert _actions(fixed) == planned
    assert not target.find_by_identifier("Patient", PF_SYSTEM + "patient-id", "planted")
    assert target.find_by_identifier("Patient", PF_SYSTEM + "patient-id", gone_id) == [kept]
    assert target.find_by_identifier("Patient", PF_SYSTEM + "patient-id", "stranger")
