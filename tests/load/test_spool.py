"""Attachment copies in bounded memory (issue 19): a download streams into a spool (memory up to
load.attachment_memory_bytes, then a private nameless scratch file), the SHA-1, size and cap are
taken while streaming, and the upload streams from the spool with its Content-Length."""

from __future__ import annotations

import base64
import hashlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from load_helpers import FakeClock, spool_files

from pfsync.core.errors import StateError
from pfsync.core.settings import LoadSettings
from pfsync.load import spool as spool_module
from pfsync.load.binaries import AttachmentError, Binaries, Copied
from pfsync.load.idmap import IdMap
from pfsync.load.spool import Spool
from pfsync.medplum.client import MedplumClient

MiB = 1024 * 1024
URL = "https://ehr.example/fhir/r4/v1/practice-1/files/scan.pdf"
MEDPLUM = "https://medplum.example/fhir/R4/"


def _sha1(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data).digest()).decode()


class _Pieces(httpx.SyncByteStream):
    """A response body arriving in network-sized pieces (httpx.MockTransport's arrive read whole)."""

    def __init__(self, data: bytes, piece: int = 64 * 1024) -> None:
        self._data, self._piece = data, piece

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._data), self._piece):
            yield self._data[start : start + self._piece]


class _Source(httpx.BaseTransport):
    def __init__(self, data: bytes, content_type: str = "application/pdf") -> None:
        self.data, self.content_type = data, content_type

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": self.content_type}, stream=_Pieces(self.data))


class _Medplum(httpx.BaseTransport):
    """Reads each request's body piece by piece, as a server would; answers from `statuses` (the
    last one repeats). `keep` False: only the size and SHA-1 are kept (the memory test)."""

    def __init__(self, *statuses: int, keep: bool = True, during: Callable[[], None] | None = None) -> None:
        self.statuses = list(statuses or (201,))
        self.keep, self.during = keep, during
        self.seen: list[dict[str, Any]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.during is not None:
            self.during()
        sha1, size, kept = hashlib.sha1(), 0, []
        assert isinstance(request.stream, httpx.SyncByteStream)
        for piece in request.stream:
            sha1.update(piece)
            size += len(piece)
            if self.keep:
                kept.append(piece)
        self.seen.append({"method": request.method, "url": str(request.url), "headers": request.headers,
                          "size": size, "hash": base64.b64encode(sha1.digest()).decode(), "body": b"".join(kept)})  # fmt: skip
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status, json={"resourceType": "Binary", "id": f"bin-{len(self.seen)}"})


@contextmanager
def _binaries(
    tmp_path: Path, source: httpx.BaseTransport, medplum: _Medplum, **load: Any
) -> Iterator[Binaries]:
    state = tmp_path / "state"
    idmap = IdMap(state / "idmap.sqlite", target=MEDPLUM)
    client = MedplumClient(httpx.Client(transport=medplum, base_url=MEDPLUM), clock=FakeClock())
    binaries = Binaries(client, httpx.Client(transport=source), idmap, LoadSettings(**load), spool_dir=state,
                        dry_run=False)  # fmt: skip
    try:
        yield binaries
    finally:
        binaries.close()
        client.close()
        idmap.close()


def _copy(binaries: Binaries, content_type: str = "application/pdf") -> Copied | None:
    [copied] = binaries.copy([({"contentType": content_type, "url": URL}, URL, content_type)])
    return copied


def _no_spool_left(state: Path) -> None:
    assert spool_files(state) == []  # no scratch file open
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith("idmap.sqlite")) == []


# ------------------------------------------------------------------------------------------- Spool
def test_spool_keeps_small_content_in_memory_and_large_content_in_a_nameless_private_file(
    tmp_path: Path,
) -> None:
    small, large = b"a" * 1000, os.urandom(3 * MiB + 17)
    with Spool(tmp_path, 4096) as spool:
        for start in range(0, len(small), 300):
            spool.write(small[start : start + 300])
        assert not spool.on_disk and spool.size == len(small) and spool.digest == _sha1(small)
        assert b"".join(spool.body()) == small
    with Spool(tmp_path, MiB) as spool:
        for start in range(0, len(large), 100_000):
            spool.write(large[start : start + 100_000])
        assert spool.on_disk and spool.size == len(large) and spool.digest == _sha1(large)
        [(link, mode)] = spool_files(tmp_path)
        assert mode == 0o600 and link.endswith(" (deleted)")  # no name leads to it
        assert list(tmp_path.iterdir()) == []
        body = spool.body()
        assert b"".join(body) == large and b"".join(body) == large  # read again from the first byte
        fd = spool.fileno()
    assert fd is not None and spool_files(tmp_path) == []
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the scratch file went with it


# ------------------------------------------------------------------------------- copy and upload
def test_upload_streams_the_spool_with_content_length_and_the_exact_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    seen_while_uploading: list[list[tuple[str, int]]] = []
    medplum = _Medplum(201, during=lambda: seen_while_uploading.append(spool_files(tmp_path / "state")))
    with _binaries(tmp_path, _Source(data), medplum) as binaries:
        copied = _copy(binaries)
    assert copied is not None and (copied.size, copied.digest, copied.mid) == (
        len(data),
        _sha1(data),
        "bin-1",
    )
    [upload] = medplum.seen
    assert upload["method"] == "POST" and upload["url"] == f"{MEDPLUM}Binary"
    assert upload["headers"]["content-length"] == str(len(data))
    assert "transfer-encoding" not in upload["headers"]  # never chunked
    assert upload["headers"]["content-type"] == "application/pdf"
    assert upload["body"] == data
    [[(link, mode)]] = seen_while_uploading  # the spool, on disk while the upload ran
    assert mode == 0o600 and link.endswith(" (deleted)")
    _no_spool_left(tmp_path / "state")


def test_small_attachment_upload_has_the_same_request_shape(tmp_path: Path) -> None:
    data = b"%PDF-1.4 tiny"
    medplum = _Medplum(201)
    with _binaries(tmp_path, _Source(data, "application/pdf; charset=binary"), medplum) as binaries:
        assert _copy(binaries) is not None
    [upload] = medplum.seen
    assert upload["headers"]["content-length"] == str(len(data)) and upload["body"] == data
    assert upload["headers"]["content-type"] == "application/pdf"
    assert "transfer-encoding" not in upload["headers"]


def test_a_429_sends_the_whole_spool_again(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 5)
    medplum = _Medplum(429, 201)
    with _binaries(tmp_path, _Source(data), medplum) as binaries:
        copied = _copy(binaries)
    assert copied is not None and copied.mid == "bin-2"
    assert [(s["size"], s["hash"]) for s in medplum.seen] == [(len(data), _sha1(data))] * 2
    _no_spool_left(tmp_path / "state")


def test_no_spool_is_left_after_a_failed_upload_or_an_attachment_over_the_cap(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    with _binaries(tmp_path, _Source(data), _Medplum(500)) as binaries, pytest.raises(AttachmentError):
        _copy(binaries)
    _no_spool_left(tmp_path / "state")
    medplum = _Medplum(201)
    with _binaries(tmp_path, _Source(data), medplum, attachment_max_bytes=2 * MiB) as binaries:
        assert _copy(binaries) is None  # over the cap: left as it is
    assert medplum.seen == []
    _no_spool_left(tmp_path / "state")


def test_a_spool_that_cannot_be_written_sends_the_resource_to_the_retry_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(directory: Path) -> int:
        raise StateError(f"cannot create a temporary file in {directory}: No space left on device")

    monkeypatch.setattr(spool_module, "anonymous_file", full)
    source = _Source(os.urandom(2 * MiB))
    with (
        _binaries(tmp_path, source, _Medplum(201)) as binaries,
        pytest.raises(AttachmentError, match="cannot spool it to disk") as raised,
    ):
        _copy(binaries)
    assert raised.value.retryable


def test_a_source_answering_a_fhir_binary_resource_uploads_its_decoded_content(tmp_path: Path) -> None:
    raw = os.urandom(300_000)
    doc = orjson.dumps(
        {"resourceType": "Binary", "contentType": "image/png", "data": base64.b64encode(raw).decode()}
    )
    medplum = _Medplum(201)
    with _binaries(
        tmp_path, _Source(doc, "application/fhir+json"), medplum, attachment_memory_bytes=64 * 1024
    ) as b:
        copied = _copy(b, "image/png")
    assert copied is not None and (copied.size, copied.digest) == (len(raw), _sha1(raw))
    [upload] = medplum.seen
    assert upload["body"] == raw and upload["headers"]["content-type"] == "image/png"
    assert upload["headers"]["content-length"] == str(len(raw))
    _no_spool_left(tmp_path / "state")


def test_copying_a_20_mib_attachment_holds_a_small_part_of_it_in_memory(tmp_path: Path) -> None:
    data = os.urandom(20 * MiB)  # allocated before tracing starts: the source's copy, not ours
    medplum = _Medplum(201, keep=False)
    with _binaries(tmp_path, _Source(data), medplum) as binaries:
        tracemalloc.start()
        try:
            copied = _copy(binaries)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert copied is not None and copied.digest == _sha1(data)
    assert [(s["size"], s["hash"]) for s in medplum.seen] == [(len(data), _sha1(data))]
    # load.attachment_memory_bytes (1 MiB) plus network pieces; the whole body would be 20 MiB (40 joined).
    assert peak < 4 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"


def test_content_uploaded_once_is_remembered_by_its_id_not_by_a_future(tmp_path: Path) -> None:
    """The same content twice in a run: one upload; what stays for the rest of the run is the
    Medplum id (a string), not the Future other workers waited on (a Condition and its locks)."""
    medplum = _Medplum(201)
    with _binaries(tmp_path, _Source(b"%PDF the same scan"), medplum) as binaries:
        first, second = _copy(binaries), _copy(binaries)
        assert first is not None and second is not None
        assert first.mid == second.mid and (first.uploaded, second.uploaded) == (True, False)
        assert len(medplum.seen) == 1
        assert list(binaries._promises.values()) == [first.mid]
