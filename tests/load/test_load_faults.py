"""Loader integration under quota, kills, async batches, attachments and missing references."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from doubles import ListSink
from load_helpers import (
    SOURCE,
    SYNTHEA_SMALL,
    binary_uploads,
    fixture_types,
    identity_counts,
    load_all,
    make_loader,
    write_ndjson,
)
from refcheck import check_references
from target_fixtures import fhir_client

from pfsync.core.log import level_of
from pfsync.core.settings import LoadSettings
from pfsync.sandbox.target.server import TargetSandbox

SMALL_SET = [SYNTHEA_SMALL / f"{t}.ndjson" for t in ("Patient", "Organization", "Practitioner")]


def test_load_under_quota_paces_itself_and_loses_nothing(target: TargetSandbox, tmp_path: Path) -> None:
    target.add_client("quota-small", "quota-small-secret", quota=5000, quota_window=2.0)
    client = fhir_client(target, "quota-small", "quota-small-secret")
    result = load_all(target, tmp_path, SMALL_SET, client=client)
    assert result.quarantined == 0 and result.retry_queued == 0
    assert target.count() == 17 + 36 + 36
    assert result.throttled <= 3  # paced from the RateLimit header: a probe at most per window, not a storm
    assert set(identity_counts(target, ["Patient", "Organization", "Practitioner"]).values()) == {1}


def test_load_429_storm_is_waited_out(target: TargetSandbox, tmp_path: Path) -> None:
    load_all(target, tmp_path, [SYNTHEA_SMALL / "Organization.ndjson"])  # warm id map
    target.faults.throttle_next(4)
    from load_helpers import FakeClock

    clock = FakeClock()
    result = load_all(target, tmp_path, [SYNTHEA_SMALL / "Practitioner.ndjson"], clock=clock)
    assert result.quarantined == 0 and result.retry_queued == 0
    assert target.count("Practitioner") == 36
    assert clock.slept  # the waits came from msBeforeNext / backoff, on the injected clock


def test_load_killed_subprocess_then_rerun_has_no_duplicates(target: TargetSandbox, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parents[1])!r}]\n"
        "from pathlib import Path\n"
        "from load_helpers import load_all, SYNTHEA_SMALL\n"
        "from pfsync.sandbox.target.server import TargetSandbox\n"
        "class T: pass\n"
        "t = T(); t.fhir_url = sys.argv[1]; t.base_url = sys.argv[2]\n"
        "load_all(t, Path(sys.argv[3]), [SYNTHEA_SMALL])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), target.fhir_url, target.base_url, str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})  # fmt: skip
    deadline = time.monotonic() + 60
    while target.count() < 800 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < target.count() < 4904
    result = load_all(target, tmp_path, [SYNTHEA_SMALL])
    assert result.quarantined == 0
    assert target.count() == 4904
    assert set(identity_counts(target, fixture_types()).values()) == {1}
    assert check_references(target) == []


def test_load_async_batch_mode(target: TargetSandbox, tmp_path: Path) -> None:
    settings = LoadSettings(async_batch=True)
    files = [SYNTHEA_SMALL / f"{t}.ndjson" for t in ("Patient", "Organization", "Practitioner", "Encounter")]
    result = load_all(target, tmp_path, files, settings=settings)
    assert result.total("created") == 17 + 36 + 36 + 431
    assert result.quarantined == 0
    # (each async job also leaves an AsyncJob and a Binary holding its results, as on Medplum)
    assert sum(target.count(t) for t in ("Patient", "Organization", "Practitioner", "Encounter")) == 520
    assert target.count("AsyncJob") == result.stats["bundles"]
    assert check_references(target, ["Patient", "Encounter"]) == []


def _source_client(routes: dict[str, tuple[int, bytes, str]], seen: list[str]) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        key = request.url.path + ("?" + request.url.query.decode() if request.url.query else "")
        status, body, ctype = routes.get(key, routes.get(request.url.path, (404, b"", "text/plain")))
        return httpx.Response(status, content=body, headers={"Content-Type": ctype})

    return httpx.Client(transport=httpx.MockTransport(handle))


def test_load_attachment_becomes_medplum_binary_once(target: TargetSandbox, tmp_path: Path) -> None:
    pdf = b"%PDF-1.4 fake document " * 50
    base_path = "/fhir/r4/v1/practice-1"
    seen: list[str] = []
    client = _source_client({f"{base_path}/files/note.pdf": (200, pdf, "application/pdf")}, seen)
    doc = {"resourceType": "DocumentReference", "id": "d1", "status": "current",
           "content": [{"attachment": {"contentType": "application/pdf", "url": f"{SOURCE.base_url}/files/note.pdf"}}]}  # fmt: skip
    data = write_ndjson(tmp_path / "DocumentReference.ndjson", [doc])
    load_all(target, tmp_path, [data], source_client=client)
    stored = target.resources("DocumentReference")[0]["content"][0]["attachment"]
    assert stored["url"].startswith("Binary/")
    assert stored["size"] == len(pdf)
    assert stored["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()
    assert target.store.get_binary(stored["url"].split("/")[1]) == ("application/pdf", pdf)
    binaries = binary_uploads(target)
    # Same content again under another resource: downloaded, not uploaded again.
    doc2 = {**doc, "id": "d2"}
    load_all(
        target, tmp_path, [write_ndjson(tmp_path / "DocumentReference.ndjson", [doc2])], source_client=client
    )
    again = target.resources("DocumentReference")
    assert {d["content"][0]["attachment"]["url"] for d in again} == {stored["url"]}
    assert binary_uploads(target) == binaries


def test_load_attachment_not_copied_is_said_not_silent(target: TargetSandbox, tmp_path: Path) -> None:
    """An attachment over the size cap or of a type not allowed stays pointing at the source; the
    resource is still written, and the run says so (a count and a warning event per resource)."""
    base_path = "/fhir/r4/v1/practice-1"
    seen: list[str] = []
    routes = {f"{base_path}/files/big.pdf": (200, b"%PDF" + b"x" * 5000, "application/pdf"),
              f"{base_path}/files/scan.tiff": (200, b"II*\x00 tiff", "image/tiff"),
              f"{base_path}/files/ok.pdf": (200, b"%PDF small", "application/pdf")}  # fmt: skip
    client = _source_client(routes, seen)

    def doc(sid: str, *names: str) -> dict[str, Any]:
        return {"resourceType": "DocumentReference", "id": sid, "status": "current",
                "content": [{"attachment": {"contentType": "application/pdf", "url": f"{SOURCE.base_url}/files/{n}"}}
                            for n in names]}  # fmt: skip

    data = write_ndjson(
        tmp_path / "DocumentReference.ndjson", [doc("d1", "big.pdf", "ok.pdf"), doc("d2", "scan.tiff")]
    )
    events = ListSink()
    settings = LoadSettings(attachment_max_bytes=1000, attachment_content_types=("application/pdf",))
    result = load_all(target, tmp_path, [data], source_client=client, settings=settings, events=events)
    assert result.quarantined == 0 and result.total("created") == 2
    assert result.total("attachments_left") == 2
    stored = {
        d["id"]: [c["attachment"]["url"] for c in d["content"]] for d in target.resources("DocumentReference")
    }
    urls = sorted(u for us in stored.values() for u in us)
    assert [u for u in urls if u.startswith("Binary/")] and sum(
        u.startswith(SOURCE.base_url) for u in urls
    ) == 2
    left = events.of("load_attachment_left")
    assert sorted((e["line"], e["attachments"]) for e in left) == [(1, 1), (2, 1)]
    assert level_of("load_attachment_left", left[0]) == logging.WARNING


def test_load_copies_attachments_concurrently_each_content_once(
    target: TargetSandbox, tmp_path: Path
) -> None:
    # Copies run on workers while Bundles flow (a practice has thousands of documents). Three
    # contents shared by 24 documents, downloads slow enough to overlap: each content is uploaded
    # once; a 503 goes to the retry queue and a 404 to the quarantine; a document that names
    # another one being copied waits for it and is written once, with its Medplum id.
    base_path = "/fhir/r4/v1/practice-1"
    contents = [f"%PDF-1.4 document {n} ".encode() * 40 for n in range(3)]
    routes = {f"{base_path}/files/{n}.pdf": (200, c, "application/pdf") for n, c in enumerate(contents)}
    routes[f"{base_path}/files/busy.pdf"] = (503, b"", "text/plain")
    seen: list[str] = []
    inner = _source_client(routes, seen)
    lock, active, most = threading.Lock(), [0], [0]

    def download(request: httpx.Request) -> httpx.Response:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.02)
            return inner.send(request)
        finally:
            with lock:
                active[0] -= 1

    slow = httpx.Client(transport=httpx.MockTransport(download))

    def doc(i: int, name: str) -> dict[str, Any]:
        return {"resourceType": "DocumentReference", "id": f"d{i}", "status": "current",
                "content": [{"attachment": {"contentType": "application/pdf",
                                            "url": f"{SOURCE.base_url}/files/{name}"}}]}  # fmt: skip

    docs = [doc(i, f"{i % 3}.pdf") for i in range(24)]
    docs[5]["relatesTo"] = [{"code": "replaces", "target": {"reference": "DocumentReference/d4"}}]
    docs += [doc(90, "busy.pdf"), doc(91, "gone.pdf")]
    data = write_ndjson(tmp_path / "DocumentReference.ndjson", docs)
    result = load_all(target, tmp_path, [data], source_client=slow)

    assert result.retry_queued == 1 and result.quarantined == 1
    stored = {d["identifier"][0]["value"]: d for d in target.resources("DocumentReference")}
    assert sorted(stored) == sorted(f"d{i}" for i in range(24))
    assert set(identity_counts(target, ["DocumentReference"]).values()) == {1}
    uploads = binary_uploads(target)
    assert uploads == 3
    for i in range(24):
        att = stored[f"d{i}"]["content"][0]["attachment"]
        assert target.store.get_binary(att["url"].split("/")[1]) == ("application/pdf", contents[i % 3])
        assert att["hash"] == base64.b64encode(hashlib.sha1(contents[i % 3]).digest()).decode()
    assert stored["d5"]["relatesTo"][0]["target"]["reference"] == f"DocumentReference/{stored['d4']['id']}"
    assert result.total("created") == 24 and target.stats.writes == 24 + 3
    assert most[0] <= 4  # docs/practice-fusion.md: at most a few parallel downloads, however many copy


def test_load_fetches_missing_references_from_source(target: TargetSandbox, tmp_path: Path) -> None:
    base_path = "/fhir/r4/v1/practice-1"
    practitioner = {"resourceType": "Practitioner", "id": "dr-9", "name": [{"family": "Who"}]}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": practitioner}]}
    seen: list[str] = []
    client = _source_client(
        {f"{base_path}/Practitioner": (200, orjson.dumps(bundle), "application/fhir+json")}, seen
    )
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": "e1", "status": "finished",
                           "class": {"code": "AMB"}, "participant": [{"individual": {"reference": "Practitioner/dr-9"}}],
                           "serviceProvider": {"reference": "Organization/nowhere", "display": "Gone Clinic"}}  # fmt: skip
    result = load_all(
        target, tmp_path, [write_ndjson(tmp_path / "Encounter.ndjson", [enc])], source_client=client
    )
    assert any("_id=dr-9" in url for url in seen)
    assert result.by_type["Practitioner"]["created"] == 1
    stored = target.resources("Encounter")[0]
    mid = target.resources("Practitioner")[0]["id"]
    assert stored["participant"][0]["individual"]["reference"] == f"Practitioner/{mid}"
    # The organization exists nowhere: a logical reference, remembered for a later run.
    assert stored["serviceProvider"]["identifier"]["value"] == "nowhere"
    assert stored["serviceProvider"]["display"] == "Gone Clinic"
    assert result.logical_references == 1
    org = {"resourceType": "Organization", "id": "nowhere", "name": "Found Clinic"}
    later = load_all(target, tmp_path, [write_ndjson(tmp_path / "Organization.ndjson", [org])])
    assert later.logical_references == 0
    upgraded = target.resources("Encounter")[0]["serviceProvider"]
    assert upgraded["reference"] == f"Organization/{target.resources('Organization')[0]['id']}"
    assert check_references(target, ["Encounter"]) == []


def test_load_retry_queue_is_replayed_first(target: TargetSandbox, tmp_path: Path) -> None:
    load_all(
        target, tmp_path, [write_ndjson(tmp_path / "warm.ndjson", [{"resourceType": "Patient", "id": "w"}])]
    )
    data = write_ndjson(tmp_path / "Patient.ndjson", [{"resourceType": "Patient", "id": "r1"}])
    target.faults.error_next(50, status=503)
    from load_helpers import FakeClock

    # A warm id map and conditional PUTs: the Bundle is the first request, and it keeps failing.
    result = load_all(target, tmp_path, [data], clock=FakeClock(), mode="conditional")
    target.faults.clear()
    assert result.retry_queued == 1 and result.quarantined == 0
    queue = tmp_path / "default" / "retry.ndjson"
    with make_loader(target, tmp_path) as loader:
        loader.retry_pending()
        again = loader.finish()
    assert again.total("created") == 1
    assert target.count("Patient") == 2
    assert not queue.exists() or queue.read_text() == ""
