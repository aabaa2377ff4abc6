"""Identity ownership over real HTTP: a hostile practice cannot take over another practice's resources.

Two practices of one source sandbox are synced into one target as sources `a` and `b`, each with
its own identifier system (the README's `{source}` template). Practice a serves a Patient that
carries b's identifier for b's patient (issue 16): b's patient must stay untouched through every
step (a's create, a's update, a's delete, b's syncs) and a's resource must be created as a's own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.marks import OWNER_TAG_SYSTEM
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

PRACTICE_A = "0a0a0a0a-1111-4111-8111-0a0a0a0a0a0a"
PRACTICE_B = "0b0b0b0b-2222-4222-8222-0b0b0b0b0b0b"
TEMPLATE = "https://practicefusion.com/fhir/{source}/{type_lower}-id"
A_SYSTEM = "https://practicefusion.com/fhir/a/patient-id"
B_SYSTEM = "https://practicefusion.com/fhir/b/patient-id"
runner = CliRunner()


def _patient(pid: str, family: str, *identifiers: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": family}],
        "identifier": list(identifiers),
    }


@pytest.fixture
def practices(tmp_path: Path, source_factory: Callable[..., SourceSandbox]) -> SourceSandbox:
    data = tmp_path / "data"
    for practice, rows in (
        (PRACTICE_A, [_patient("a-1", "Alpha")]),
        (PRACTICE_B, [_patient("victim", "Victim"), _patient("b-2", "Beta")]),
    ):
        (data / practice).mkdir(parents=True)
        (data / practice / "Patient.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return source_factory(data_dir=data, practices=[PRACTICE_A, PRACTICE_B])


def _env(source: SourceSandbox, target: TargetSandbox, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "pfsync.toml"
    config.write_text("".join(
        f'[[sources]]\nname = "{name}"\nbase_url = "{source.base_url(practice)}"\nclient_id = "pfsync-sandbox"\n'
        f'client_secret = "sandbox-secret"\nauth_method = "client_secret_basic"\nidentifier_system = "{TEMPLATE}"\n\n'
        for name, practice in (("a", PRACTICE_A), ("b", PRACTICE_B))
    ))  # fmt: skip
    return {
        "PFSYNC_CONFIG": str(config), "PF_RESOURCE_TYPES": "Patient", "MEDPLUM_BASE_URL": target.base_url,
        "MEDPLUM_CLIENT_ID": "pfsync-target", "MEDPLUM_CLIENT_SECRET": "target-secret",
        "PFSYNC_STATE_DIR": str(tmp_path / "state"), "PFSYNC_LOG_FORMAT": "json", "PFSYNC_ATTACHMENTS": "false",
        "PFSYNC_SINCE_OVERLAP": "0s",
    }  # fmt: skip


def _sync(env: dict[str, str], name: str, logs: list[str] | None = None) -> dict[str, int]:
    result = runner.invoke(app, ["sync", "--json", "--source", name], env=env)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith('{"event":"sync_summary"')]
    assert lines, result.output
    assert result.exit_code == 0, result.output
    if logs is not None:
        logs.append(result.output)
    (only,) = orjson.loads(lines[-1])["sources"]
    return dict(only["counts"].get("Patient", {}))


def _by_identifier(target: TargetSandbox, system: str, value: str) -> list[dict[str, Any]]:
    return target.find_by_identifier("Patient", system, value)


def _plant(target: TargetSandbox, resource: dict[str, Any]) -> tuple[str, str]:
    """Create a resource in the target directly (not through pfsync): its id and versionId."""
    form = {
        "grant_type": "client_credentials",
        "client_id": "pfsync-target",
        "client_secret": "target-secret",
    }
    token = httpx.post(target.base_url + "oauth2/token", data=form).json()["access_token"]
    created = httpx.post(
        target.fhir_url + "Patient", json=resource, headers={"Authorization": f"Bearer {token}"}
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["meta"]["versionId"]


def test_hostile_practice_cannot_touch_another_practices_patient(
    practices: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    env = _env(practices, target, tmp_path)
    hostile = _patient("attacker", "ATTACKER", {"system": B_SYSTEM, "value": "victim"})
    practices.upsert(hostile, PRACTICE_A)

    # a first: its resource is created as its own, without b's identifier.
    assert _sync(env, "a").get("created") == 2
    (mine,) = _by_identifier(target, A_SYSTEM, "attacker")
    assert [i["system"] for i in mine["identifier"]] == [A_SYSTEM]
    assert {"system": OWNER_TAG_SYSTEM, "code": "a"} in mine["meta"]["tag"]
    assert _by_identifier(target, B_SYSTEM, "victim") == []

    # b creates its own patient (not an update of a's).
    counts = _sync(env, "b")
    assert counts.get("created") == 2 and not counts.get("updated")
    (victim,) = _by_identifier(target, B_SYSTEM, "victim")
    assert victim["id"] != mine["id"] and victim["name"] == [{"family": "Victim"}]
    version = victim["meta"]["versionId"]

    # a changes, then deletes its resource; b syncs after each: b's patient never moves.
    practices.upsert({**hostile, "name": [{"family": "ATTACKER2"}]}, PRACTICE_A)
    assert _sync(env, "a").get("updated") == 1
    assert _sync(env, "b").get("created", 0) == 0
    practices.delete("Patient", "attacker", PRACTICE_A)
    assert _sync(env, "a").get("deleted") == 1
    assert _by_identifier(target, A_SYSTEM, "attacker") == []
    assert _sync(env, "b").get("created", 0) == 0
    (after,) = _by_identifier(target, B_SYSTEM, "victim")
    assert after["id"] == victim["id"] and after["meta"]["versionId"] == version
    assert after["name"] == [{"family": "Victim"}]


def test_a_match_of_another_source_is_never_adopted(
    practices: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """Defence in depth: a resource that already carries b's identifier but is a's (written by an
    older pfsync, before identifiers were cleaned: no owner tag, a's meta.source) is left alone."""
    env = _env(practices, target, tmp_path)
    planted = _patient("x", "ATTACKER", {"system": B_SYSTEM, "value": "victim"})
    del planted["id"]
    planted["meta"] = {"source": practices.base_url(PRACTICE_A)}
    planted_id, planted_version = _plant(target, planted)

    logs: list[str] = []
    assert _sync(env, "b", logs).get("created") == 2
    assert f'"ids":["Patient/{planted_id}"]' in logs[0]  # reported (load_foreign_match)
    found = _by_identifier(target, B_SYSTEM, "victim")
    assert len(found) == 2
    stranger = next(r for r in found if r["id"] == planted_id)
    assert stranger["meta"]["versionId"] == planted_version and stranger["name"] == [{"family": "ATTACKER"}]
    # A run from a fresh state directory finds its own among the two and changes nothing.
    again = _sync({**env, "PFSYNC_STATE_DIR": str(tmp_path / "fresh")}, "b")
    assert again.get("unchanged") == 2 and not again.get("created") and not again.get("updated")


def test_conditional_mode_quarantines_rather_than_overwrite_a_stranger(
    practices: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """`PUT Type?identifier=` cannot tell owners apart: with a stranger found, nothing is sent."""
    env = {**_env(practices, target, tmp_path), "PFSYNC_UPSERT_MODE": "conditional"}
    planted = {"resourceType": "Patient", "identifier": [{"system": B_SYSTEM, "value": "victim"}],
               "meta": {"tag": [{"system": OWNER_TAG_SYSTEM, "code": "a"}]}}  # fmt: skip
    _, version = _plant(target, planted)
    result = runner.invoke(app, ["sync", "--json", "--source", "b"], env=env)
    assert result.exit_code == 6, result.output
    quarantined = (tmp_path / "state" / "b" / "quarantine.ndjson").read_text()
    assert "that is not this source's carries identifier" in quarantined
    (stranger,) = _by_identifier(target, B_SYSTEM, "victim")
    assert stranger["meta"]["versionId"] == version
    assert len(_by_identifier(target, B_SYSTEM, "b-2")) == 1


def test_a_deletion_never_lands_on_a_stranger(
    practices: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """The source deletes an identity the id map never saw; Medplum holds only a stranger carrying
    that identifier: in neither mode does `DELETE Type?identifier=` (or any delete) reach it."""
    for mode in ("conditional", "direct"):
        (tmp_path / mode).mkdir()
        env = {**_env(practices, target, tmp_path / mode), "PFSYNC_UPSERT_MODE": mode}
        assert runner.invoke(app, ["sync", "--json", "--source", "b"], env=env).exit_code == 0
        ghost = f"ghost-{mode}"
        planted = {"resourceType": "Patient", "identifier": [{"system": B_SYSTEM, "value": ghost}],
                   "meta": {"tag": [{"system": OWNER_TAG_SYSTEM, "code": "a"}]}}  # fmt: skip
        _, version = _plant(target, planted)
        practices.upsert(_patient(ghost, "Ghost"), PRACTICE_B)
        practices.delete("Patient", ghost, PRACTICE_B)
        result = runner.invoke(app, ["sync", "--json", "--source", "b"], env=env)
        assert result.exit_code in (0, 6), result.output
        (stranger,) = _by_identifier(target, B_SYSTEM, ghost)
        assert stranger["meta"]["versionId"] == version
