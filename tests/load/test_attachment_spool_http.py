"""Attachments larger than load.attachment_memory_bytes copied over real HTTP on 127.0.0.1, from the
source sandbox into the target sandbox (issue 19): the Binary holds the exact bytes, the upload
carried a Content-Length (the sandbox reads the body by it), and the spool was private while it
existed and is gone afterwards, whether the copy succeeded, its upload failed or it was over the cap."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from load_helpers import FakeClock, binary_uploads, spool_files, write_ndjson
from source_fixtures import source_token
from target_fixtures import medplum_client

from pfsync.core.settings import LoadSettings, SourceSettings
from pfsync.load.binaries import AttachmentError, Binaries, Job
from pfsync.load.idmap import IdMap
from pfsync.load.loader import Loader
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.source.store import FIXTURE_ORIGIN
from pfsync.sandbox.target.server import TargetSandbox

MiB = 1024 * 1024
SIZE = 5 * MiB  # five times load.attachment_memory_bytes' default


def _sha1(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data).digest()).decode()


def _source_client(source: SourceSandbox) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {source_token(source)}"}, timeout=30)


def _document(source: SourceSandbox, sid: str) -> tuple[dict[str, Any], bytes]:
    """A DocumentReference at the source whose attachment is SIZE bytes, and those bytes."""
    doc = {"resourceType": "DocumentReference", "id": sid, "status": "current",
           "content": [{"attachment": {"contentType": "application/pdf", "size": SIZE,
                                       "url": f"{FIXTURE_ORIGIN}/Binary/{sid}-scan"}}]}  # fmt: skip
    stored = source.upsert(doc)
    with _source_client(source) as sc:
        data = sc.get(stored["content"][0]["attachment"]["url"]).content
    assert len(data) == SIZE
    return stored, data


def _no_spool_left(directory: Path) -> None:
    assert spool_files(directory) == []  # no scratch file still open
    assert [p.name for p in directory.iterdir() if p.name.startswith(".pfsync-")] == []  # nor named


def test_a_large_attachment_is_copied_through_a_private_spool_with_its_content_length(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    stored_at_source, data = _document(source, "doc-big-1")
    state = tmp_path / "state"
    spool_dir = state / "default"  # the source's state directory
    uploads: list[tuple[httpx.Headers, list[tuple[str, int]]]] = []

    def record(request: httpx.Request) -> None:  # before the body is sent: the spool is there
        if request.method == "POST" and request.url.path.endswith("/Binary"):
            uploads.append((request.headers, spool_files(spool_dir)))

    medplum = medplum_client(target)
    medplum.http.event_hooks["request"].append(record)
    with (
        _source_client(source) as sc,
        Loader(SourceSettings(name="default", base_url=source.base_url()), LoadSettings(), medplum,
               state_dir=state, source_client=sc) as loader,
    ):  # fmt: skip
        loader.load_file(write_ndjson(tmp_path / "DocumentReference.ndjson", [stored_at_source]))
        result = loader.finish()

    assert result.quarantined == 0 and result.retry_queued == 0
    stored = target.resources("DocumentReference")[0]["content"][0]["attachment"]
    assert stored["url"].startswith("Binary/")
    assert stored["size"] == SIZE and stored["hash"] == _sha1(data)
    assert target.store.get_binary(stored["url"].split("/")[1]) == ("application/pdf", data)
    [(headers, spools)] = uploads
    assert headers["Content-Length"] == str(SIZE) and "Transfer-Encoding" not in headers
    assert headers["Content-Type"] == "application/pdf"
    [(_, mode)] = spools  # the attachment was on disk, not in memory, while it was uploaded
    assert mode == 0o600
    _no_spool_left(spool_dir)


@contextmanager
def _binaries(source: SourceSandbox, target: TargetSandbox, state: Path, **load: Any) -> Iterator[Binaries]:
    """Binaries alone over real HTTP, on the test's thread: the Binary upload is the only request to
    the target while it runs, so a fault armed for the next request hits it."""
    idmap = IdMap(state / "idmap.sqlite", target=target.fhir_url)
    medplum = medplum_client(target, clock=FakeClock())
    with _source_client(source) as sc:
        binaries = Binaries(medplum, sc, idmap, LoadSettings(**load), spool_dir=state, dry_run=False)
        try:
            yield binaries
        finally:
            binaries.close()
            idmap.close()


def _job(stored: dict[str, Any]) -> Job:
    att = stored["content"][0]["attachment"]
    return att, att["url"], att["contentType"]


def test_over_http_a_429_resends_the_spool_and_no_spool_outlives_a_failure_or_the_cap(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    stored_at_source, data = _document(source, "doc-big-2")
    state = tmp_path / "state"
    with _binaries(source, target, state) as binaries:
        target.faults.throttle_next(1)
        [copied] = binaries.copy([_job(stored_at_source)])
        assert copied is not None and copied.uploaded and target.stats.faults_fired["throttle"] == 1
        assert target.store.get_binary(copied.mid) == ("application/pdf", data)  # the whole body, sent again
        _no_spool_left(state)

        target.faults.error_next(1, 500)
        with pytest.raises(AttachmentError, match="Binary upload answered 500"):
            binaries.copy([_job(_document(source, "doc-big-3")[0])])
        assert target.stats.faults_fired["error"] == 1
        _no_spool_left(state)

    uploads = binary_uploads(target)
    with _binaries(source, target, state, attachment_max_bytes=2 * MiB) as binaries:
        assert binaries.copy([_job(_document(source, "doc-big-4")[0])]) == [None]  # left as it is
        _no_spool_left(state)
    assert binary_uploads(target) == uploads
