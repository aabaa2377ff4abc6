"""The loader with the REAL source sandbox over HTTP: a Patient-level export fed in a hostile order,
missing targets fetched from the source by batched `_id` searches, attachments copied to Binary."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx
import orjson
import pytest
from load_helpers import SYNTHEA_SMALL, binary_uploads, identity_counts, write_ndjson
from refcheck import check_references
from source_fixtures import export_and_wait, read_ndjson, source_token
from target_fixtures import medplum_client

from pfsync.core.settings import LoadSettings, SourceSettings
from pfsync.load.loader import Loader, LoadResult
from pfsync.load.references import export_types
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.source.store import FIXTURE_ORIGIN
from pfsync.sandbox.target.server import TargetSandbox


def _source_settings(source: SourceSandbox) -> SourceSettings:
    return SourceSettings(name="default", base_url=source.base_url())


def _source_client(source: SourceSandbox) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {source_token(source)}"}, timeout=30)


def _patient_export(source: SourceSandbox, out: Path) -> list[Path]:
    """A real Patient-level export of the source, downloaded as Type.n.ndjson files."""
    token = source_token(source)
    _, manifest = export_and_wait(source, token)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for n, item in enumerate(manifest["output"]):
        resources = read_ndjson(item["url"], token)
        files.append(write_ndjson(out / f"{item['type']}.{n}.ndjson", resources))
    return files


def _hostile(files: list[Path]) -> list[Path]:
    """Observations first, then everything else referenced-types-last (Patients at the very end)."""
    first = [f for f in files if f.name.startswith("Observation.")]
    rest = sorted((f for f in files if f not in first), key=lambda f: (f.name.startswith("Patient."), f.name))
    return first + list(reversed(rest[:-1])) + rest[-1:] if rest else first


def _load(source: SourceSandbox, target: TargetSandbox, state: Path, files: list[Path], *,
          hint: bool, reads_before_finish: list[int] | None = None) -> LoadResult:  # fmt: skip
    with (
        _source_client(source) as sc,
        Loader(_source_settings(source), LoadSettings(), medplum_client(target), state_dir=state,
               source_client=sc) as loader,
    ):  # fmt: skip
        if hint:
            loader.expect_types(export_types("patient", ()))
        for path in files:
            loader.load_file(path)
        if reads_before_finish is not None:
            reads_before_finish.append(source.stats.count("read"))
        return loader.finish()


@pytest.mark.parametrize("hint", [True, False], ids=["expect_types", "no_hint"])
def test_load_patient_export_hostile_order_writes_every_resource_once(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, hint: bool
) -> None:
    # A few Encounters name a Location the source does not have (as Practice Fusion exports do):
    # they, and only they, end with a logical reference; what references them must still wait for
    # them and be written once, not written with a logical reference and upgraded moments later.
    dead = 0
    for line in (SYNTHEA_SMALL / "Encounter.ndjson").read_bytes().splitlines()[:40:8]:
        enc = orjson.loads(line)
        enc["location"] = [{"location": {"reference": "Location/closed-wing", "display": "Closed wing"}}]
        source.upsert(enc)
        dead += 1
    patient = orjson.loads((SYNTHEA_SMALL / "Patient.ndjson").read_bytes().splitlines()[3])
    patient["managingOrganization"] = {"reference": "Organization/closed-clinic", "display": "Closed clinic"}
    source.upsert(patient)  # everything of this patient waits for it
    dead += 1
    files = _patient_export(source, tmp_path / "export")
    exported_types = {f.name.split(".")[0] for f in files}
    assert "Practitioner" not in exported_types and "Organization" not in exported_types  # must be fetched
    assert files and _hostile(files)[0].name.startswith("Observation.")
    exported = sum(1 for f in files for line in f.read_bytes().splitlines() if line)
    source.stats.clear()
    reads: list[int] = []

    result = _load(source, target, tmp_path / "state", _hostile(files), hint=hint, reads_before_finish=reads)

    fetched = result.total("fetched")
    assert result.by_type["Practitioner"]["fetched"] > 0 and result.by_type["Organization"]["fetched"] > 0
    assert result.quarantined == 0 and result.retry_queued == 0
    # Written exactly once: one write per resource in Medplum, no update of anything this run created.
    assert target.count() == exported + fetched
    assert target.stats.writes == target.count()
    assert result.total("updated") == 0
    assert result.total("created") == target.count()
    assert result.logical_references == dead
    types = sorted(exported_types | {"Practitioner", "Organization"})
    assert set(identity_counts(target, types).values()) == {1}
    assert check_references(target, types) == []
    # Batched `_id` searches, never one request per target.
    assert source.stats.count("read") * 10 <= fetched
    # With the hint the targets came early (before finish); without it, at finish only.
    assert (reads[0] > 0) if hint else (reads[0] == 0)

    writes = target.stats.writes
    again = _load(source, target, tmp_path / "state", files, hint=hint)
    assert target.stats.writes == writes  # unchanged re-sync: zero writes
    assert again.total("created") == again.total("updated") == 0


def test_load_attachment_from_source_becomes_medplum_binary_once(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    doc = {"resourceType": "DocumentReference", "id": "doc-att-1", "status": "current",
           "content": [{"attachment": {"contentType": "application/pdf", "size": 3000,
                                       "url": f"{FIXTURE_ORIGIN}/Binary/att-1"}}]}  # fmt: skip
    stored_at_source = source.upsert(doc)
    url = stored_at_source["content"][0]["attachment"]["url"]
    assert url == f"{source.base_url()}/Binary/att-1"  # the sandbox serves it on its own origin
    with _source_client(source) as sc:
        pdf = sc.get(url).content
    assert len(pdf) == 3000
    state = tmp_path / "state"

    def load(resource: dict[str, object], name: str) -> None:
        data = write_ndjson(tmp_path / name, [resource])
        with (
            _source_client(source) as sc,
            Loader(_source_settings(source), LoadSettings(), medplum_client(target), state_dir=state,
                   source_client=sc) as loader,
        ):  # fmt: skip
            loader.load_file(data)
            loader.finish()

    source.stats.clear()
    load(stored_at_source, "DocumentReference.1.ndjson")
    assert source.stats.count("attachment") == 1
    stored = target.resources("DocumentReference")[0]["content"][0]["attachment"]
    assert stored["url"].startswith("Binary/")
    assert stored["size"] == len(pdf)
    assert stored["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()
    assert target.store.get_binary(stored["url"].split("/")[1]) == ("application/pdf", pdf)
    uploads = binary_uploads(target)
    assert uploads == 1

    # The same content under another resource: downloaded again (no hash to know it by), not uploaded.
    load({**stored_at_source, "id": "doc-att-2"}, "DocumentReference.2.ndjson")
    assert {d["content"][0]["attachment"]["url"] for d in target.resources("DocumentReference")} == {
        stored["url"]
    }
    again = binary_uploads(target)
    assert again == uploads


def test_load_with_a_refused_target_type_writes_dependants_as_their_targets_land(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    # The practice did not authorise Organization reads (docs/practice-fusion.md "Scopes": an app gets
    # what the admin authorised). Encounters name Organizations, and nearly everything else names
    # an Encounter. The refused type must cost one request, its referrers get logical references
    # at once, and what waits for those referrers is written as they land: nothing is held on disk
    # until the end of the run (where it would be parsed twice and written in one late burst).
    files = _patient_export(source, tmp_path / "export")
    export_dir = files[0].parent
    exported = sum(1 for f in files for line in f.read_bytes().splitlines() if line)
    types = sorted({f.name.split(".")[0] for f in files} | {"Practitioner"})
    scope = " ".join(f"system/{t}.read" for t in types)  # everything but Organization
    source.stats.clear()
    sc = httpx.Client(headers={"Authorization": f"Bearer {source_token(source, scope)}"}, timeout=30)
    with sc, Loader(_source_settings(source), LoadSettings(), medplum_client(target), state_dir=tmp_path / "state",
                    source_client=sc) as loader:  # fmt: skip
        loader.load_paths([export_dir])
        result = loader.finish()

    assert result.stats["held_on_disk"] == 0
    assert result.quarantined == 0 and result.retry_queued == 0
    org_requests = [s for s in source.stats.requests("read") if "/Organization" in s.url]
    assert len(org_requests) == 1 and org_requests[0].status == 403  # no per-id reads after a refusal
    assert "Organization" not in result.by_type
    fetched = result.total("fetched")
    assert result.by_type["Practitioner"]["fetched"] > 0
    assert target.count() == exported + fetched == target.stats.writes  # each written once
    encounters = target.resources("Encounter")
    assert encounters and all("reference" not in e["serviceProvider"] for e in encounters)
    assert all(e["serviceProvider"]["identifier"]["system"].endswith("organization-id") for e in encounters)
    assert result.logical_references > 0
    assert check_references(target, types) == []  # the rest is literal and resolves
