"""`pfsync verify` against the target sandbox over real HTTP: a clean load verifies to zeros, planted
faults are each named, `--fix` repairs them and `--dry-run` writes nothing."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import FIXTURES
from target_fixtures import fhir_client

from pfsync.core.errors import StateError
from pfsync.core.settings import Settings, identifier_system, load_settings
from pfsync.load.loader import Loader
from pfsync.medplum.auth import medplum_auth
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import RetryPolicy
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.verify.report import VerifyOptions
from pfsync.verify.verifier import verify

pytestmark = pytest.mark.integration

SMALL = FIXTURES / "synthea-small"
# A closed subset of synthea-small (2 types with references between them), so fault tests stay fast.
SUBSET_TYPES = ("Patient", "Organization", "Practitioner", "Encounter", "Condition")


def make_settings(target: TargetSandbox, state_dir: Path, **env: str) -> Settings:
    base = {
        "PF_FHIR_BASE_URL": "https://ehr.example/fhir/r4/v1/practice-1",
        "MEDPLUM_BASE_URL": target.base_url,
        "MEDPLUM_CLIENT_ID": "pfsync-target",
        "MEDPLUM_CLIENT_SECRET": "target-secret",
        "PFSYNC_STATE_DIR": str(state_dir),
        "PFSYNC_FETCH_MISSING_REFERENCES": "false",
        "PFSYNC_ATTACHMENTS": "false",
    }
    return load_settings(flags={}, env={**base, **env}, config_path=None)


@pytest.fixture
def medplum(target: TargetSandbox, tmp_path: Path) -> Iterator[tuple[Settings, MedplumClient]]:
    settings = make_settings(target, tmp_path / "state")
    with connect(settings) as client:
        yield settings, client


@contextmanager
def connect(settings: Settings) -> Iterator[MedplumClient]:
    """A MedplumClient with a private token (not the process's shared one: each test its own sandbox)."""
    with httpx.Client(timeout=60.0) as http:
        auth = medplum_auth(settings.medplum, http, http=settings.http)
        yield MedplumClient(http, fhir_url=settings.medplum.fhir_url, auth=auth,
                            policy=RetryPolicy.from_settings(settings.http))  # fmt: skip


def subset(tmp_path: Path) -> Path:
    """Patients, their Encounters and Conditions, and the Organizations/Practitioners they cite."""
    out = tmp_path / "export"
    out.mkdir()
    for rtype in SUBSET_TYPES:
        shutil.copy(SMALL / f"{rtype}.ndjson", out / f"{rtype}.ndjson")
    return out


def load(settings: Settings, client: MedplumClient, data: Path) -> None:
    source = settings.source()
    with Loader(source, settings.load, client, state_dir=settings.state_dir, http=settings.http) as loader:
        loader.load_paths([data])
        result = loader.finish()
    assert result.quarantined == 0 and result.retry_queued == 0


def run(settings: Settings, client: MedplumClient, data: Path, **options: Any) -> Any:
    return verify(settings, settings.source(), client, [data], VerifyOptions(**options))


def first_line(path: Path) -> dict[str, Any]:
    return dict(orjson.loads(path.read_bytes().split(b"\n", 1)[0]))


def test_verify_clean_load_of_synthea_small_reports_zeros(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox
) -> None:
    settings, client = medplum
    load(settings, client, SMALL)
    writes = target.stats.writes
    report = run(settings, client, SMALL, content=True)
    total = report.total
    assert (total.source, total.present, total.medplum) == (4904, 4904, 4904)
    assert (total.missing, total.duplicated, total.extra, total.dangling, total.drift) == (0, 0, 0, 0, 0)
    assert report.ok and report.findings == ()
    assert target.stats.writes == writes  # verify only reads
    # One paged search per type (1,000 per page) and nothing else on a clean target.
    assert report.quota_used == 20 * report.requests
    assert report.requests < 30


def write_manifest(data: Path) -> None:
    """manifest.json as `pfsync export` leaves it: each file with its size and sha256."""
    files = [{"name": p.name, "kind": "output", "type": p.stem, "lines": p.read_bytes().count(b"\n"),
              "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "url": ""}
             for p in sorted(data.glob("*.ndjson"))]  # fmt: skip
    (data / "manifest.json").write_bytes(orjson.dumps({"version": 1, "files": files}))


def test_verify_refuses_an_export_whose_files_changed_since_it_was_downloaded(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox, tmp_path: Path
) -> None:
    """A kept export whose Encounter file lost its second half: compared with it, those Encounters
    look absent from the source, and `--fix --fix-extras` deleted 171 of them from Medplum before
    this check. verify refuses the export, naming the file, before it reads or writes Medplum."""
    settings, client = medplum
    data = subset(tmp_path)
    load(settings, client, data)
    write_manifest(data)
    assert run(settings, client, data).ok  # intact: compared as usual
    encounters = data / "Encounter.ndjson"
    lines = encounters.read_bytes().split(b"\n")
    encounters.write_bytes(b"\n".join(lines[: len(lines) // 2]) + b"\n")
    writes, requests = target.stats.writes, sum(target.stats.requests.values())
    with pytest.raises(StateError, match=r"Encounter\.ndjson has \d+ bytes, manifest\.json records \d+"):
        run(settings, client, data, fix=True, fix_extras=True)
    from typer.testing import CliRunner

    from pfsync.cli import app

    cli = CliRunner().invoke(app, ["verify", "--from", str(data), "--fix", "--fix-extras"],
                             env=cli_env(target, settings.state_dir))  # fmt: skip
    assert cli.exit_code == 7 and "Encounter.ndjson" in cli.stderr and "Traceback" not in cli.output
    assert "pfsync verify --export" in cli.stderr  # the hint
    assert target.stats.writes == writes and sum(target.stats.requests.values()) == requests


def plant_faults(target: TargetSandbox, settings: Settings, data: Path) -> dict[str, Any]:
    """Delete one Patient, duplicate one Condition, break one Encounter reference, change one
    Condition field, add one extra Organization. Returns what was planted."""
    source = settings.source()
    c = fhir_client(target)
    patient = first_line(data / "Patient.ndjson")
    [p] = target.find_by_identifier("Patient", identifier_system(source, "Patient"), patient["id"])
    assert c.delete(f"Patient/{p['id']}").status_code == 200

    conditions = (data / "Condition.ndjson").read_bytes().splitlines()
    dup_sid = orjson.loads(conditions[1])["id"]
    [dup] = target.find_by_identifier("Condition", identifier_system(source, "Condition"), dup_sid)
    copy = {k: v for k, v in dup.items() if k not in ("id", "meta")}
    copy["meta"] = {"tag": dup["meta"]["tag"]}  # a second copy pfsync made (its owner tag kept)
    assert c.post("Condition", content=orjson.dumps(copy)).status_code == 201

    drift_sid = orjson.loads(conditions[2])["id"]
    [changed] = target.find_by_identifier("Condition", identifier_system(source, "Condition"), drift_sid)
    changed["clinicalStatus"] = {"text": "edited in Medplum"}
    assert c.put(f"Condition/{changed['id']}", content=orjson.dumps(changed)).status_code == 200

    enc_sid = next(
        e["id"]
        for e in map(orjson.loads, (data / "Encounter.ndjson").read_bytes().splitlines())
        if patient["id"] not in e["subject"]["reference"]
    )
    [enc] = target.find_by_identifier("Encounter", identifier_system(source, "Encounter"), enc_sid)
    enc["serviceProvider"] = {"reference": "Organization/00000000-0000-4000-8000-000000000000"}
    assert c.put(f"Encounter/{enc['id']}", content=orjson.dumps(enc)).status_code == 200

    extra = {"resourceType": "Organization", "name": "Gone from the EHR", "meta": {"source": source.base_url},
             "identifier": [{"system": identifier_system(source, "Organization"), "value": "no-such-org"}]}  # fmt: skip
    r = c.post("Organization", content=orjson.dumps(extra))
    assert r.status_code == 201
    return {"patient": patient["id"], "patient_mid": p["id"], "dup": dup_sid, "drift": drift_sid,
            "encounter": enc_sid, "extra_mid": r.json()["id"]}  # fmt: skip


def test_verify_names_each_planted_fault_and_fix_repairs_them(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox, tmp_path: Path
) -> None:
    settings, client = medplum
    data = subset(tmp_path)
    load(settings, client, data)
    assert run(settings, client, data, content=True).ok
    planted = plant_faults(target, settings, data)

    report = run(settings, client, data, content=True)
    assert not report.ok
    t = report.total
    # Drift: the edited Condition and the Encounter whose reference was broken (referrers of the
    # deleted Patient are not compared: their content cannot be rendered without it).
    assert (t.missing, t.duplicated, t.extra, t.drift) == (1, 1, 1, 2)
    assert [f.sid for f in report.of("missing")] == [planted["patient"]]
    assert [(f.type, f.sid) for f in report.of("duplicated")] == [("Condition", planted["dup"])]
    assert [f.mid for f in report.of("extra")] == [planted["extra_mid"]]
    assert {(f.type, f.sid) for f in report.of("drift")} == {
        ("Condition", planted["drift"]),
        ("Encounter", planted["encounter"]),
    }
    dangling = report.of("dangling")
    # The broken Encounter reference, plus every reference to the deleted Patient.
    assert ("Encounter", planted["encounter"]) in [(f.type, f.sid) for f in dangling]
    assert any(f.target == f"Patient/{planted['patient_mid']}" for f in dangling)

    stats_before = target.stats.as_dict()
    count_before = target.count()
    dry = run(settings, client, data, content=True, fix=True, fix_extras=True, dry_run=True)
    assert target.stats.as_dict()["writes"] == stats_before["writes"] and target.count() == count_before
    kinds = {(a.kind, a.type) for a in dry.actions}
    assert {("delete_duplicate", "Condition"), ("delete_extra", "Organization"), ("resend", "Patient"),
            ("resend", "Encounter"), ("resend", "Condition")} <= kinds  # fmt: skip
    assert not any(a.done for a in dry.actions) and dry.after is None

    fixed = run(settings, client, data, content=True, fix=True, fix_extras=True)
    assert all(a.done for a in fixed.actions), [a for a in fixed.actions if not a.done]
    assert fixed.after is not None and fixed.ok
    again = run(settings, client, data, content=True)
    t = again.total
    assert (t.missing, t.duplicated, t.extra, t.dangling, t.drift) == (0, 0, 0, 0, 0)
    assert again.ok
    # The oldest copy of the duplicated Condition was kept: the one the loader created.
    [kept] = target.find_by_identifier(
        "Condition", identifier_system(settings.source(), "Condition"), planted["dup"]
    )
    assert kept["meta"]["versionId"]


def cli_env(target: TargetSandbox, state_dir: Path) -> dict[str, str]:
    return {
        "PF_FHIR_BASE_URL": "https://ehr.example/fhir/r4/v1/practice-1",
        "MEDPLUM_BASE_URL": target.base_url,
        "MEDPLUM_CLIENT_ID": "pfsync-target",
        "MEDPLUM_CLIENT_SECRET": "target-secret",
        "PFSYNC_STATE_DIR": str(state_dir),
        "PFSYNC_FETCH_MISSING_REFERENCES": "false",
        "PFSYNC_ATTACHMENTS": "false",
    }


def test_verify_cli_json_exit_codes_and_fix(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from pfsync.cli import app

    settings, client = medplum
    data = subset(tmp_path)
    load(settings, client, data)
    env = cli_env(target, settings.state_dir)
    runner = CliRunner()

    ok = runner.invoke(app, ["verify", "--from", str(data), "--json"], env=env)
    assert ok.exit_code == 0, ok.output
    doc = orjson.loads(ok.stdout)
    assert doc["ok"] is True and doc["total"]["present"] == doc["total"]["source"] > 0
    assert doc["quotaUsed"] == 20 * doc["requests"]

    c = fhir_client(target)
    patient = first_line(data / "Patient.ndjson")
    [p] = target.find_by_identifier("Patient", identifier_system(settings.source(), "Patient"), patient["id"])
    c.delete(f"Patient/{p['id']}")

    bad = runner.invoke(app, ["verify", "--from", str(data), "--json"], env=env)
    assert bad.exit_code == 11
    doc = orjson.loads(bad.stdout)
    assert doc["findings"]["missing"] == [{"type": "Patient", "sid": patient["id"]}]
    assert "1 missing" in bad.stderr

    # Tables are for terminals (README "Output"); TTY_COMPATIBLE=1 asks for them off one.
    table = runner.invoke(app, ["verify", "--from", str(data), "--dry-run", "--limit", "1"],
                          env={**env, "TTY_COMPATIBLE": "1"})  # fmt: skip
    assert table.exit_code == 11
    assert "missing (1)" in table.stdout and f"Patient {patient['id']}" in table.stdout
    assert "--fix would:" in table.stdout and "resend " in table.stdout
    # The Patient and every resource referring to it; --limit 1 lists one of them.
    assert "resources to re-send, 1 listed" in table.stdout
    assert (
        target.find_by_identifier("Patient", identifier_system(settings.source(), "Patient"), patient["id"])
        == []
    )

    fixed = runner.invoke(app, ["verify", "--from", str(data), "--fix"], env={**env, "TTY_COMPATIBLE": "1"})
    assert fixed.exit_code == 0, fixed.output
    assert "after --fix" in fixed.stdout
    assert (
        len(
            target.find_by_identifier(
                "Patient", identifier_system(settings.source(), "Patient"), patient["id"]
            )
        )
        == 1
    )

    usage = runner.invoke(app, ["verify", "--from", str(data), "--fix-extras"], env=env)
    assert usage.exit_code == 2


# Peak RSS of the verify process itself: VmHWM belongs to the process's own address space, while
# getrusage's ru_maxrss survives fork+exec and would report this (large) test process's peak.
RSS_SCRIPT = (
    "import atexit, resource, sys\n"
    "def peak():\n"
    "    try:\n"
    "        for line in open('/proc/self/status'):\n"
    "            if line.startswith('VmHWM:'):\n"
    "                return int(line.split()[1])\n"
    "    except OSError:\n"
    "        pass\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "atexit.register(lambda: sys.stderr.write('MAXRSS_KB %d\\n' % peak()))\n"
    "from pfsync.cli import main\n"
    "main()\n"
)
RSS_LIMIT_KB = 250 * 1024  # measured ~130 MB on synthea-full: one page of 1,000 resources, ids on disk


def verify_subprocess(target: TargetSandbox, state_dir: Path, data: Path) -> tuple[dict[str, Any], int]:
    """`pfsync verify --from DATA --content --json` as its own process: -> (report, peak RSS in KB)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "MEDPLUM_", "PFSYNC_"))}
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, "verify", "--from", str(data), "--content", "--json"],
        env={**env, **cli_env(target, state_dir)}, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = int(proc.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0])
    return orjson.loads(proc.stdout), rss


def gzipped_subset(tmp_path: Path) -> Path:
    import gzip

    out = tmp_path / "export-gz"
    out.mkdir()
    for rtype in SUBSET_TYPES:
        (out / f"{rtype}.ndjson.gz").write_bytes(gzip.compress((SMALL / f"{rtype}.ndjson").read_bytes()))
    return out


def test_verify_process_on_gzipped_export_stays_small(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox, tmp_path: Path
) -> None:
    """The always-on twin of the synthea-full test: same path (gzip files, CLI process, RSS)."""
    settings, client = medplum
    data = gzipped_subset(tmp_path)
    load(settings, client, data)
    doc, rss = verify_subprocess(target, settings.state_dir, data)
    assert doc["ok"] and doc["total"]["present"] == doc["total"]["source"] == target.count()
    assert doc["total"]["drift"] == 0
    print(f"verify gzipped subset: peak RSS {rss / 1024:.0f} MB")
    assert rss < RSS_LIMIT_KB


def test_verify_on_a_stock_quota_project_waits_out_429_and_finishes(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox, tmp_path: Path
) -> None:
    settings, client = medplum
    data = subset(tmp_path)
    load(settings, client, data)
    # 150 points per 2 s window: the ~12 searches (240 points) cannot fit one window.
    target.add_client("verify-quota", "quota-secret", quota=150, quota_window=2.0)
    quota_settings = make_settings(
        target, settings.state_dir, MEDPLUM_CLIENT_ID="verify-quota", MEDPLUM_CLIENT_SECRET="quota-secret"
    )
    with connect(quota_settings) as quota_client:
        report = run(quota_settings, quota_client, data)
    assert report.ok and report.total.present == report.total.source
    assert report.throttled >= 1  # refused once (the probe that proves the quota is enforced) ...
    assert report.throttled < report.requests  # ... then paced from RateLimit instead of hammering


@pytest.mark.slow
def test_verify_synthea_full_completes_with_flat_memory(
    medplum: tuple[Settings, MedplumClient], target: TargetSandbox
) -> None:
    settings, client = medplum
    full = FIXTURES / "synthea-full"
    load(settings, client, full)
    doc, rss = verify_subprocess(target, settings.state_dir, full)
    print(
        f"verify synthea-full: peak RSS {rss / 1024:.0f} MB, quota {doc['quotaUsed']}, {doc['requests']} requests"
    )
    t = doc["total"]
    assert (t["source"], t["present"], t["missing"], t["duplicated"], t["dangling"], t["drift"]) == (
        38483, 38483, 0, 0, 0, 0,
    )  # fmt: skip
    assert rss < RSS_LIMIT_KB  # ids live on disk: 38k resources fit the same bound as a few hundred
