"""`pfsync sync` end to end against both sandboxes: full, incremental, deletes, overlap, backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from target_fixtures import medplum_of
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.sync.state import LocalStateStore

TYPES = "Patient,Condition,Encounter"
PF_PATIENT = "https://practicefusion.com/fhir/patient-id"
runner = CliRunner()


@pytest.fixture
def loader_ready() -> None:
    """The loader's own modules land separately; until they import, the full-run tests are skipped."""
    try:
        import pfsync.load.loader  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"loader not importable yet: {exc}")


def sync_env(source: SourceSandbox, target: TargetSandbox, state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "PF_FHIR_BASE_URL": source.base_url(), "PF_CLIENT_ID": "pfsync-sandbox", "PF_CLIENT_SECRET": "sandbox-secret",
        "PFSYNC_AUTH_METHOD": "client_secret_basic", "PF_RESOURCE_TYPES": TYPES, "PFSYNC_SOURCE_NAME": "pf",
        "MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": "pfsync-target",
        "MEDPLUM_CLIENT_SECRET": "target-secret", "PFSYNC_STATE_DIR": str(state_dir),
        "PFSYNC_LOG_FORMAT": "json", "PFSYNC_ATTACHMENTS": "false", **extra,
    }  # fmt: skip


def run_sync(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["sync", "--json", *args], env=env)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith('{"event":"sync_summary"')]
    assert lines, result.output
    return result.exit_code, orjson.loads(lines[-1])


def _counts(summary: dict[str, Any], key: str) -> int:
    return sum(c.get(key, 0) for s in summary["sources"] for c in s["counts"].values())


def test_sync_full_then_incremental_with_deletes(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, loader_ready: None
) -> None:
    env = sync_env(source, target, tmp_path / "state")
    code, first = run_sync(env)
    assert code == 0, first["sources"][0]["error"]
    created = _counts(first, "created")
    assert created > 0 and target.count("Patient") > 0
    state = LocalStateStore(tmp_path / "state").load("pf")
    assert state.transaction_time == first["sources"][0]["transactionTime"] and state.in_flight is None
    total = target.count()

    # Between runs: one changed patient, one new condition, one deleted encounter.
    patient = next(iter(source.state.store.search(source.practices[0], "Patient", None, 1)))
    patient = orjson.loads(patient)
    patient["gender"] = "other" if patient.get("gender") != "other" else "unknown"
    source.upsert(patient)
    enc = orjson.loads(next(iter(source.state.store.search(source.practices[0], "Encounter", None, 1))))
    source.delete("Encounter", enc["id"])

    code, second = run_sync(env)
    assert code == 0, second
    assert second["sources"][0]["counts"]["Patient"]["updated"] == 1
    assert _counts(second, "created") == 0
    assert _counts(second, "deleted") == 1
    assert target.count() == total - 1
    (stored,) = target.find_by_identifier("Patient", PF_PATIENT, patient["id"])
    assert stored["gender"] == patient["gender"]

    code, third = run_sync(env)  # nothing changed: the overlap re-exports a few minutes, harmlessly
    assert code == 0
    # The deletion falls inside the overlap window and is re-applied: harmless, nothing changes.
    assert _counts(third, "created") == _counts(third, "updated") == 0
    assert target.count() == total - 1


def test_sync_medplum_backend_lease_refuses_second_run(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    import httpx

    from pfsync.sync.holders import Holder
    from pfsync.sync.state_medplum import MedplumStateStore

    store = MedplumStateStore(
        medplum_of(httpx.Client(auth=("pfsync-target", "target-secret")), fhir_url=target.fhir_url)
    )
    lease = store.acquire("pf", Holder(31, "pod-elsewhere", "2026-01-01T00:00:00.000Z"))
    env = sync_env(source, target, tmp_path / "state", PFSYNC_STATE_BACKEND="medplum")
    try:
        code, summary = run_sync(env)
        assert code == 8
        assert "pod-elsewhere" in summary["sources"][0]["error"]
        status = runner.invoke(app, ["status", "--json"], env=env)
        assert status.exit_code == 9  # never succeeded; the lease holder is shown
        assert "pod-elsewhere" in orjson.loads(status.stdout)["sources"][0]["lockHolder"]
    finally:
        lease.release()
    assert target.count("Patient") == 0  # the refused run wrote nothing


@pytest.mark.parametrize("backend", ["local", "medplum"])
def test_sync_three_sources_one_failing_reports_worst(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, backend: str, loader_ready: None
) -> None:
    config = tmp_path / "pfsync.toml"
    good = source.base_url()
    config.write_text(
        "\n".join(
            f'[[sources]]\nname = "{name}"\nbase_url = "{url}"\nclient_id = "pfsync-sandbox"\n'
            f'client_secret = "{secret}"\nauth_method = "client_secret_basic"\n'
            f'identifier_system = "https://example.org/{name}/{{type_lower}}-id"\n'
            for name, url, secret in [("a", good, "sandbox-secret"), ("b", good, "wrong-secret"), ("c", good, "sandbox-secret")]
        )
    )  # fmt: skip
    env = {k: v for k, v in sync_env(source, target, tmp_path / "state", PFSYNC_STATE_BACKEND=backend).items()
           if not k.startswith(("PF_FHIR", "PF_CLIENT", "PFSYNC_SOURCE_NAME", "PFSYNC_AUTH"))}  # fmt: skip
    code, summary = run_sync({**env, "PFSYNC_CONFIG": str(config), "PF_RESOURCE_TYPES": "Patient"})
    by_source = {s["source"]: s for s in summary["sources"]}
    assert by_source["b"]["exitCode"] == 4  # refused credentials
    assert by_source["a"]["exitCode"] == by_source["c"]["exitCode"] == 0
    assert code == 4
    assert len(target.resources("Patient")) == 2 * by_source["a"]["counts"]["Patient"]["created"]


def test_live_engines_group_members_from_patient_export(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    """PF-like Group reads carry no member list: members come from a _type=Patient group export."""
    import threading

    from pfsync.core.settings import load_settings
    from pfsync.sync.live import LiveEngines

    settings = load_settings(
        env=sync_env(source, target, tmp_path / "state", PFSYNC_GROUPS="bulk-data-testing-group")
    )
    engines = LiveEngines(settings, settings.sources[0], threading.Event())
    try:
        before = engines.group_members("bulk-data-testing-group", tmp_path / "m1")
        assert len(before) == 9  # docs/practice-fusion.md: the testing group has 9 patients
        newcomer = sorted(set(source.state.store.patient_ids(source.practices[0])) - before)[0]
        source.add_to_group("bulk-data-testing-group", [newcomer])
        after = engines.group_members("bulk-data-testing-group", tmp_path / "m2")
        assert after - before == {newcomer}
    finally:
        engines.close()


# kill -9 / SIGTERM then resume: tests/sync/test_sync_resume.py (four kill points, content compared).
