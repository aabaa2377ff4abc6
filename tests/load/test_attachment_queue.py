"""Resources waiting for an attachment copy slot are bounded in bytes (load.park_max_bytes)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from load_helpers import FakeClock

from pfsync.core.settings import LoadSettings, SourceSettings
from pfsync.load.attachments import Attachments
from pfsync.load.binaries import Copied, Job
from pfsync.load.idmap import IdMap
from pfsync.load.pending import Waiting
from pfsync.load.transform import Prepared, TransformContext
from pfsync.medplum.client import MedplumClient


def _item(n: int, raw_bytes: int) -> Waiting:
    p = Prepared("DocumentReference", f"d{n}", {"resourceType": "DocumentReference", "id": f"d{n}"}, [])
    return Waiting(p, "DocumentReference.ndjson", n, b"x" * raw_bytes)


def test_resources_waiting_for_a_copy_slot_are_bounded_in_bytes_not_in_count(tmp_path: Path) -> None:
    raw = 1_000
    cost = _item(0, raw).cost
    # An eighth of park_max_bytes waits for a slot: room for exactly five of these resources.
    settings = LoadSettings(park_max_bytes=8 * 5 * cost)
    idmap = IdMap(tmp_path / "idmap.sqlite", target="http://medplum.test/fhir/R4/")
    never = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(599)))
    medplum = MedplumClient(never, fhir_url="http://medplum.test/fhir/R4/", clock=FakeClock())
    ctx = TransformContext(SourceSettings(name="default", base_url="http://ehr.test/fhir"))
    attachments = Attachments(medplum, never, idmap, settings, ctx, clock=FakeClock(), dry_run=False)
    release = threading.Event()

    def blocked_copy(jobs: list[Job]) -> list[Copied | None]:
        release.wait(30)
        return [None for _ in jobs]  # left as they are: nothing to apply

    attachments._binaries.copy = blocked_copy  # type: ignore[method-assign]
    job: Job = ({"url": "http://ehr.test/fhir/Binary/b", "contentType": "application/pdf"}, "u", None)
    try:
        n = 0
        while not attachments.full:
            attachments.start(_item(n, raw), [job])
            n += 1
            assert n < 100, "the queue never fills"
        running = attachments.pending - 5
        assert n == running + 5  # the running copies plus five waiting, whatever their count
        attachments.start(_item(n, 10 * raw), [job])  # a big one still gets in line: full stays true
        assert attachments.full
        release.set()
        done = 0
        while attachments.pending:
            done += len(attachments.finished(block=True))
        assert done == n + 1 and not attachments.full
    finally:
        release.set()
        attachments.close()
        idmap.close()
        never.close()
