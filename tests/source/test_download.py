"""Unit tests of streaming validation, retries, Range resume, token origins and atomic landing."""

from __future__ import annotations

import gzip
import io
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from doubles import ListSink
from hypothesis import given, settings
from hypothesis import strategies as st
from test_export_fakes import FakeClock, lines_of

from pfsync.core.errors import AuthError, ExportError, HTTPError, InterruptedRunError
from pfsync.core.ndjson import BadLine, Record, iter_file
from pfsync.net.http import RetryPolicy
from pfsync.source.bulk import JobExpired, Origins
from pfsync.source.download import Downloader
from pfsync.source.exportjob import ExportDir, sha256_of
from pfsync.source.linecheck import FEED_BYTES, Validator
from pfsync.source.manifest import ManifestFile

BASE = "https://ehr.example/fhir"
FILE_URL = f"{BASE}/Binary/export/job/Patient/1"
PATIENTS = [{"resourceType": "Patient", "id": f"p{i}", "name": [{"family": "X" * i}]} for i in range(1, 6)]
NDJSON = b"".join(orjson.dumps(p) + b"\n" for p in PATIENTS)


MODES = ["structure", "full"]


def validate(data: bytes, *, chunk: int = 7, expected: str = "Patient", max_line: int = 10_000,
             count: int | None = None, mode: Any = "structure") -> tuple[Validator, bytes]:  # fmt: skip
    out = io.BytesIO()
    v = Validator(out, expected, max_line, unpack_bundles=expected != "Bundle", mode=mode)
    for i in range(0, len(data), chunk):
        v.feed(data[i : i + chunk])
    v.finish()
    return v, out.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("mode", MODES)
def test_validator_passes_ndjson_through_unchanged(chunk: int, mode: str) -> None:
    v, out = validate(NDJSON, chunk=chunk, mode=mode)
    assert out == NDJSON
    assert (v.lines, v.bad_lines, v.damaged(5), v.summary_problems(5)) == (5, 0, False, [])


@pytest.mark.parametrize(
    "data",
    [
        gzip.compress(NDJSON),
        NDJSON.replace(b"\n", b"\r\n"),
        # blank lines and no trailing newline (docs/bulk-data.md, recorded case 52)
        b"\n\n" + NDJSON.rstrip(b"\n"),
        orjson.dumps(PATIENTS[0], option=orjson.OPT_INDENT_2) + b"\n",
        orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": p} for p in PATIENTS]},
                     option=orjson.OPT_INDENT_2),
    ],
    ids=["gzip", "crlf", "blank-lines-no-final-newline", "pretty-resource", "pretty-bundle"],
)  # fmt: skip
@pytest.mark.parametrize("mode", MODES)
def test_validator_normalises_to_ndjson(data: bytes, mode: str) -> None:
    v, out = validate(data, mode=mode)
    assert lines_of(out) == lines_of(NDJSON)[: v.lines]
    assert out.endswith(b"\n") and b"\r" not in out and b"\n\n" not in out
    assert v.bad_lines == 0 and not v.truncated
    assert all(len(line) and line.startswith(b"{") for line in out.splitlines())


@pytest.mark.parametrize("mode", MODES)
def test_validator_keeps_deleted_bundles_whole(mode: str) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"request": {"method": "DELETE", "url": "Patient/p1"}}]}  # fmt: skip
    v, out = validate(orjson.dumps(bundle) + b"\n", expected="Bundle", mode=mode)
    assert lines_of(out) == [bundle] and v.summary_problems(1) == []


@pytest.mark.parametrize("mode", MODES)
def test_validator_reports_malformed_line_and_keeps_it_for_quarantine(mode: str) -> None:
    data = NDJSON.replace(b"\n", b'\n{"resourceType": "Patient", "id": broken\n', 1)
    v, out = validate(data, mode=mode)
    assert v.bad_lines == 1 and v.damaged(None)
    assert any("line 2 is not valid JSON" in p for p in v.problems)
    assert b"broken" in out and v.lines == 6


@pytest.mark.parametrize("mode", MODES)
def test_validator_detects_truncated_last_line(mode: str) -> None:
    v, _ = validate(NDJSON[:-15], mode=mode)
    assert v.truncated and v.damaged(None)
    assert any("cut short" in p for p in v.problems)


@pytest.mark.parametrize("mode", MODES)
def test_validator_drops_over_long_line_without_holding_it(mode: str) -> None:
    big = orjson.dumps({"resourceType": "Patient", "id": "big", "text": "y" * 5000}) + b"\n"
    v, out = validate(orjson.dumps(PATIENTS[0]) + b"\n" + big + NDJSON, max_line=1000, chunk=100, mode=mode)
    assert v.bad_lines == 1 and b'"big"' not in out
    assert any("longer than 1000 bytes" in p for p in v.problems)
    assert v.lines == 6


@pytest.mark.parametrize("mode", MODES)
def test_validator_reports_count_mismatch_and_unexpected_types(mode: str) -> None:
    data = NDJSON + orjson.dumps({"resourceType": "Location", "id": "l1"}) + b"\n"
    v, _ = validate(data, mode=mode)
    problems = v.summary_problems(10)
    assert "6 lines but the manifest announced 10" in problems
    assert "1 resource(s) of type Location in a Patient file" in problems
    assert v.damaged(10) and not v.damaged(6)


@pytest.mark.parametrize("mode", MODES)
def test_validator_flags_lines_without_resource_type(mode: str) -> None:
    v, _ = validate(b'{"id": 1}\n[1,2]\n', mode=mode)
    assert v.bad_lines == 2


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"id":"p9"}', "line 6 is not a FHIR resource (no resourceType)"),
        (b"[1,2]", "line 6 is not a FHIR resource (no resourceType)"),
        (b'"resourceType"', "line 6 is not a FHIR resource (no resourceType)"),
        (b'{"resourceType":"Patient","id":"p9"', "line 6 is not valid JSON"),
        (b'{"resourceType":"Patient","id":"p9"} x', "line 6 is not valid JSON"),
        (b'{"resourceType":"Location","id":"l1"}', "1 resource(s) of type Location in a Patient file"),
        (
            b'{"resourceType":"Patient\\u0022x","id":"p9"}',
            '1 resource(s) of type Patient"x in a Patient file',
        ),
    ],
    ids=["no-type", "array", "string", "unclosed", "trailing-text", "other-type", "escaped-type"],
)
def test_validator_structure_mode_parses_a_line_failing_the_cheap_check(line: bytes, reason: str) -> None:
    # A bad line still gets file/line/reason in "structure" mode: it is parsed to say why.
    v, out = validate(NDJSON + line + b"\n", mode="structure")
    assert any(p.startswith(reason) for p in v.summary_problems(6)), v.summary_problems(6)
    assert line in out and v.lines == 6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "line",
    [b'{"resourceType": "Patient", "id": "spaced"}', b'{"id":"a","resourceType":"Patient"}',
     b'{ "resourceType" : "Patient" , "id": "b" }'],
    ids=["spaced", "type-not-first", "padded"],
)  # fmt: skip
def test_validator_accepts_other_key_orders_and_spacing(mode: str, line: bytes) -> None:
    v, out = validate(NDJSON + line + b"\n", mode=mode)
    assert (v.lines, v.bad_lines, v.summary_problems(6)) == (6, 0, [])
    assert out == NDJSON + line + b"\n"


def test_validator_structure_mode_leaves_invalid_json_inside_braces_to_the_loader(tmp_path: Path) -> None:
    # The trade-off of "structure" (download.py): JSON validity of a well-framed line is the
    # loader's check; pfsync.core.ndjson reports it with file and line, and the loader quarantines it.
    data = NDJSON + b'{"resourceType":"Patient","id":broken}\n'
    structure, out = validate(data, mode="structure")
    full, _ = validate(data, mode="full")
    assert (structure.bad_lines, structure.summary_problems(6)) == (0, [])
    assert full.bad_lines == 1 and any("line 6 is not valid JSON" in p for p in full.problems)
    path = tmp_path / "Patient.1.ndjson"
    path.write_bytes(out)
    items = list(iter_file(path))
    assert [i.line for i in items if isinstance(i, Record)] == [1, 2, 3, 4, 5]
    bad = [i for i in items if isinstance(i, BadLine)]
    assert [(b.line, b.reason.startswith("not valid JSON")) for b in bad] == [(6, True)]


@pytest.mark.parametrize("mode", MODES)
def test_validator_detects_file_cut_after_a_closing_brace(mode: str) -> None:
    # The cheap check would accept a fragment ending in "}": the last line is always parsed.
    last = b'{"resourceType":"Patient","id":"p6","name":[{"family":"Y"}]}'
    v, _ = validate(NDJSON + last[: last.index(b"}") + 1], mode=mode)
    assert v.truncated and v.damaged(None)
    assert any("line 6 is cut short" in p for p in v.problems)


@pytest.mark.parametrize("mode", MODES)
def test_validator_counts_lines_across_large_blocks(mode: str) -> None:
    many = b"".join(orjson.dumps({**PATIENTS[i % 5], "id": f"p{i}"}) + b"\n" for i in range(20_000))
    v, out = validate(many, chunk=FEED_BYTES, mode=mode, count=20_000)
    assert out == many and (v.lines, v.bad_lines, v.summary_problems(20_000)) == (20_000, 0, [])


_LINES = [
    orjson.dumps(PATIENTS[0]) + b"\n",
    b'{"resourceType": "Patient", "id": "spaced"}\n',
    orjson.dumps(PATIENTS[1]) + b"\r\n",
    b"\n",
    b'{"resourceType":"Location","id":"l1"}\n',
    b'{"id":"no-type"}\n',
    b'{"resourceType":"Patient","id":"cut\n',
]


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(st.sampled_from(range(len(_LINES))), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_validator_result_does_not_depend_on_chunking_or_mode(picks: list[int], cuts: list[int]) -> None:
    # Every line here is either valid or visibly broken, so both modes must agree exactly.
    data = orjson.dumps(PATIENTS[2]) + b"\n" + b"".join(_LINES[i] for i in picks)
    results = []
    for mode in MODES:
        for bounds in ([0, len(data)], sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})):
            out = io.BytesIO()
            v = Validator(out, "Patient", 10_000, mode=mode)  # type: ignore[arg-type]
            for a, b in itertools.pairwise(bounds):
                v.feed(data[a:b])
            v.finish()
            results.append((out.getvalue(), v.lines, v.bad_lines, v.truncated, v.summary_problems(None)))
    assert all(r == results[0] for r in results[1:]), results


# ---- Downloader over a mock transport ------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


class Dropping(httpx.SyncByteStream):
    """A body that sends `data[:cut]` (in reads of `piece` bytes) then breaks the connection."""

    def __init__(self, data: bytes, cut: int, piece: int = 1 << 30) -> None:
        self.data, self.cut, self.piece = data, cut, piece

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, self.cut, self.piece):
            yield self.data[start : min(self.cut, start + self.piece)]
        raise httpx.ReadError("connection reset by peer")


def make_downloader(tmp_path: Path, handler: Handler, **kw: Any) -> tuple[Downloader, ListSink, FakeClock]:
    sink, clock = ListSink(), FakeClock()
    client = httpx.Client(transport=httpx.MockTransport(handler))
    args: dict[str, Any] = {"requires_access_token": True, "max_line_bytes": 10_000}
    args.update(kw)
    origins = args.pop("origins", Origins(BASE))
    d = Downloader(client, httpx.BasicAuth("user", "token-value"), origins, ExportDir(tmp_path),
                   RetryPolicy(retries=3, base=0.1), clock, sink, "job", **args)  # fmt: skip
    return d, sink, clock


def entry(
    url: str = FILE_URL, count: int | None = 5, kind: Any = "output", type: str = "Patient"
) -> ManifestFile:
    return ManifestFile(kind, type, url, count)


def test_download_lands_file_atomically_with_sha_and_events(tmp_path: Path) -> None:
    d, sink, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=NDJSON))
    got = d.download(entry(), "Patient.1.ndjson")
    assert got.landed.path.read_bytes() == NDJSON
    assert got.landed.sha256 == sha256_of(got.landed.path) and got.landed.lines == 5
    assert not list(tmp_path.glob(".*.part"))
    assert sink.names() == ["download_request", "download_complete"]


def test_a_file_is_fsynced_once_before_its_rename_after_giving_up_its_network_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 (download speed, durability kept): the data is fsynced once, before the rename, by a
    download that no longer holds its network slot; the directory is not fsynced per file
    (docs/export-decisions.md "Landing files durably")."""
    import os

    slots = threading.Semaphore(1)
    seen: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append(("fsync", Path(path).name if not os.path.isdir(path) else "<dir>"))
        assert slots.acquire(blocking=False), "fsynced while holding the network slot"
        slots.release()
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        seen.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=NDJSON), streams=slots)
    d.download(entry(), "Patient.1.ndjson")
    assert seen == [("fsync", ".Patient.1.ndjson.part"), ("replace", "Patient.1.ndjson")]


@pytest.mark.parametrize(
    ("url", "requires", "allow", "sent"),
    [(FILE_URL, True, (), True), ("https://storage.example/f?sig=abc", True, (), False),
     (FILE_URL, False, (), False), ("https://storage.example/f", True, ("https://storage.example",), True)],
)  # fmt: skip
def test_download_sends_credentials_only_to_allowed_origins(
    tmp_path: Path, url: str, requires: bool, allow: tuple[str, ...], sent: bool
) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, content=NDJSON)

    d, sink, _ = make_downloader(
        tmp_path, handler, requires_access_token=requires, origins=Origins(BASE, allow)
    )
    d.download(entry(url), "Patient.1.ndjson")
    assert (seen[0] is not None) is sent
    assert "sig=abc" not in str(sink.events)  # signed URLs are logged without their query


def test_download_resumes_with_range_after_connection_reset(tmp_path: Path) -> None:
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            return httpx.Response(200, stream=Dropping(NDJSON, 100))
        start = int(request.headers["Range"][6:-1])
        return httpx.Response(206, headers={"Content-Range": f"bytes {start}-{len(NDJSON) - 1}/{len(NDJSON)}"},
                              content=NDJSON[start:])  # fmt: skip

    d, sink, clock = make_downloader(tmp_path, handler)
    got = d.download(entry(), "Patient.1.ndjson")
    assert ranges == [None, "bytes=100-"]
    assert got.landed.path.read_bytes() == NDJSON and got.problems == ()
    assert sink.of("download_error")[0]["willRetry"] is True
    assert clock.slept > 0


def test_download_resumes_a_large_body_from_the_exact_byte_received(tmp_path: Path) -> None:
    # Reads are gathered into FEED_BYTES blocks before validation: a drop between two blocks must
    # still resume at the last byte received, not the last block validated.
    body = b"".join(orjson.dumps({**PATIENTS[i % 5], "id": f"p{i}"}) + b"\n" for i in range(8_000))
    cut = FEED_BYTES + 65_536 * 3 + 1_001
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            return httpx.Response(200, stream=Dropping(body, cut, piece=65_536))
        start = int(request.headers["Range"][6:-1])
        return httpx.Response(206, headers={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"},
                              content=body[start:])  # fmt: skip

    d, _, _ = make_downloader(tmp_path, handler)
    got = d.download(entry(count=8_000), "Patient.1.ndjson")
    assert ranges == [None, f"bytes={cut}-"]
    assert got.landed.path.read_bytes() == body and got.problems == ()


def test_download_restarts_when_range_is_ignored(tmp_path: Path) -> None:
    calls: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Range"))
        if len(calls) == 1:
            return httpx.Response(200, stream=Dropping(NDJSON, 60))
        return httpx.Response(200, content=NDJSON)  # no Range support: whole file again

    d, _, _ = make_downloader(tmp_path, handler)
    got = d.download(entry(), "Patient.1.ndjson")
    assert calls == [None, "bytes=60-", None]
    assert got.landed.path.read_bytes() == NDJSON


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_download_retries_temporary_statuses(tmp_path: Path, status: int) -> None:
    answers = iter(
        [httpx.Response(status, headers={"Retry-After": "2"}), httpx.Response(200, content=NDJSON)]
    )
    d, _, clock = make_downloader(tmp_path, lambda r: next(answers))
    assert d.download(entry(), "Patient.1.ndjson").landed.lines == 5
    assert clock.slept == pytest.approx(2)


def test_download_retry_decision_comes_from_the_classifier_every_5xx(tmp_path: Path) -> None:
    # docs/bulk-data.md "Download": 5xx is retried, even one with a FHIR outcome that is not `transient`
    # (a file's bytes are not the job's outcome); the decision is pfsync.http.DOWNLOAD_RULES'.
    fatal = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    answers = iter(
        [httpx.Response(501, json=fatal, headers={"Retry-After": "3"}), httpx.Response(200, content=NDJSON)]
    )
    d, sink, clock = make_downloader(tmp_path, lambda r: next(answers))
    assert d.download(entry(), "Patient.1.ndjson").landed.lines == 5
    assert clock.slept == pytest.approx(3)
    assert [e["willRetry"] for e in sink.of("download_error")] == [True]


def test_download_gives_up_after_retries_and_lands_nothing(tmp_path: Path) -> None:
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(503))
    with pytest.raises(HTTPError, match="after 3 retries"):
        d.download(entry(), "Patient.1.ndjson")
    assert not (tmp_path / "Patient.1.ndjson").exists() and not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize(("status", "error"), [(404, JobExpired), (410, JobExpired), (401, AuthError),
                                               (403, AuthError), (400, ExportError)])  # fmt: skip
def test_download_fatal_statuses(tmp_path: Path, status: int, error: type) -> None:
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(status, text="nope"))
    with pytest.raises(error):
        d.download(entry(), "Patient.1.ndjson")
    assert not (tmp_path / "Patient.1.ndjson").exists()


def test_download_fetches_damaged_file_again(tmp_path: Path) -> None:
    bodies = iter([NDJSON[:-20], NDJSON])  # first the file is cut mid-line, then it is whole
    d, sink, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=next(bodies)))
    got = d.download(entry(), "Patient.1.ndjson")
    assert got.landed.path.read_bytes() == NDJSON and got.problems == ()
    assert any("cut short" in e["message"] for e in sink.of("download_error"))


def test_download_lands_persistently_damaged_file_with_problems(tmp_path: Path) -> None:
    bad = NDJSON + b"{not json\n"
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=bad))
    got = d.download(entry(count=6), "Patient.1.ndjson")
    assert got.landed.lines == 6 and got.landed.path.read_bytes() == bad
    assert any("line 6 is not valid JSON" in p for p in got.problems)


@pytest.mark.parametrize(("validate", "reported"), [("structure", False), ("full", True)])
def test_download_validate_setting_decides_who_reports_invalid_json(
    tmp_path: Path, validate: str, reported: bool
) -> None:
    body = NDJSON + b'{"resourceType":"Patient","id":broken}\n'
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=body), validate=validate)
    got = d.download(entry(count=6), "Patient.1.ndjson")
    assert got.landed.path.read_bytes() == body and got.landed.lines == 6
    assert any("line 6 is not valid JSON" in p for p in got.problems) is reported


def test_download_converts_pretty_json_served_as_application_json(tmp_path: Path) -> None:
    pretty = orjson.dumps(PATIENTS[0], option=orjson.OPT_INDENT_2)
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=pretty,
                                                                   headers={"Content-Type": "application/json"}))  # fmt: skip
    got = d.download(entry(count=1), "Patient.1.ndjson")
    assert got.landed.path.read_bytes() == orjson.dumps(PATIENTS[0]) + b"\n"


def test_download_accepts_content_encoding_gzip(tmp_path: Path) -> None:
    body = gzip.compress(NDJSON)
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=body,
                                                                   headers={"Content-Encoding": "gzip"}))  # fmt: skip
    assert d.download(entry(), "Patient.1.ndjson").landed.path.read_bytes() == NDJSON


def test_download_collects_issues_from_error_files(tmp_path: Path) -> None:
    oo = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "warning", "code": "x", "diagnostics": "hm"}],
    }
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=orjson.dumps(oo)))
    got = d.download(entry(kind="error", type="OperationOutcome", count=None), "error.1.ndjson")
    assert [(i.severity, i.text) for i in got.issues] == [("warning", "hm")]


def test_download_stops_when_halted(tmp_path: Path) -> None:
    halt = threading.Event()
    halt.set()
    d, _, _ = make_downloader(tmp_path, lambda r: httpx.Response(200, content=NDJSON), stop=halt)
    with pytest.raises(InterruptedRunError):
        d.download(entry(), "Patient.1.ndjson")
    assert not list(tmp_path.iterdir()) or not (tmp_path / "Patient.1.ndjson").exists()
