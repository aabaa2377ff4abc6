"""Unit tests of the Bulk Data protocol client (pfsync.source.bulk) over pytest-httpx, with a fake clock."""

from __future__ import annotations

import email.utils
import itertools
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from doubles import ListSink
from pytest_httpx import HTTPXMock
from test_export_fakes import FakeClock

from pfsync.core.errors import AuthError, ExportError, HTTPError, InterruptedRunError
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import RetryPolicy
from pfsync.source.bulk import (
    ExportRequest,
    JobExpired,
    Origins,
    delete_job,
    kickoff,
    narrow_to_granted,
    requests_for,
)
from pfsync.source.manifest import issues_of, parse_manifest
from pfsync.source.poll import Poller, poll_wait

BASE = "https://ehr.example/fhir/r4/v1/practice"
STATUS = f"{BASE}/Export/abc-123"
POLICY = RetryPolicy(retries=3, max_wait=30.0, base=0.5)


def outcome(text: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


def manifest_body(**extra: Any) -> dict[str, Any]:
    return {"transactionTime": "2026-01-02T03:04:05Z", "request": f"{BASE}/Patient/$export",
            "requiresAccessToken": True, "output": [{"type": "Patient", "url": f"{BASE}/Binary/1", "count": 2}],
            "error": [], **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "path", "params"),
    [
        (ExportRequest(level="patient"), "/Patient/$export", {"_outputFormat": ["application/fhir+ndjson"]}),
        (ExportRequest(level="system", types=("Patient", "Condition")), "/$export",
         {"_outputFormat": ["application/fhir+ndjson"], "_type": ["Patient,Condition"]}),
        (ExportRequest(level="group", group_id="g1", since="2026-01-01T00:00:00Z",
                       type_filters=("Observation?category=laboratory", "Condition?clinical-status=active")),
         "/Group/g1/$export",
         {"_outputFormat": ["application/fhir+ndjson"], "_since": ["2026-01-01T00:00:00Z"],
          "_typeFilter": ["Observation?category=laboratory", "Condition?clinical-status=active"]}),
    ],
)  # fmt: skip
def test_kickoff_get_sends_level_path_params_and_exact_headers(
    httpx_mock: HTTPXMock, request_: ExportRequest, path: str, params: dict[str, list[str]]
) -> None:
    httpx_mock.add_response(status_code=202, headers={"Content-Location": STATUS})
    with httpx.Client() as client:
        url = kickoff(client, None, BASE, request_, policy=POLICY, clock=FakeClock())
    assert url == STATUS
    sent = httpx_mock.get_requests()[0]
    assert sent.method == "GET"
    assert sent.url.path == urlsplit(BASE).path + path
    assert parse_qs(sent.url.query.decode()) == params
    # docs/bulk-data.md, recorded cases 29/30: Accept is compared as a string; Prefer must say respond-async.
    assert sent.headers["Accept"] == "application/fhir+json"
    assert sent.headers["Prefer"] == "respond-async"


def test_kickoff_post_sends_parameters_body(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(status_code=202, headers={"Content-Location": "../Export/xyz"})
    req = ExportRequest(level="patient", types=("Patient", "Encounter"), since="2026-01-01T00:00:00Z",
                        method="post")  # fmt: skip
    with httpx.Client() as client:
        url = kickoff(client, None, BASE, req, policy=POLICY, clock=FakeClock())
    assert url == f"{BASE}/Export/xyz"  # relative to the kick-off URL {BASE}/Patient/$export
    sent = httpx_mock.get_requests()[0]
    assert sent.method == "POST"
    assert sent.headers["Content-Type"] == "application/fhir+json"
    body = orjson.loads(sent.content)
    assert body["resourceType"] == "Parameters"
    assert {"name": "_type", "valueString": "Patient,Encounter"} in body["parameter"]
    assert {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"} in body["parameter"]


@pytest.mark.parametrize("retry_after", ["7", "http-date"])
def test_kickoff_429_waits_retry_after_and_retries(httpx_mock: HTTPXMock, retry_after: str) -> None:
    clock = FakeClock()
    value = (
        email.utils.formatdate(clock.now() + 7, usegmt=True) if retry_after == "http-date" else retry_after
    )
    httpx_mock.add_response(
        status_code=429, headers={"Retry-After": value}, json=outcome("slow down", "throttled")
    )
    httpx_mock.add_response(status_code=202, headers={"Content-Location": STATUS})
    with httpx.Client() as client:
        assert kickoff(client, None, BASE, ExportRequest(), policy=POLICY, clock=clock) == STATUS
    assert 6.0 <= clock.slept <= 7.5


def test_kickoff_429_with_a_long_retry_after_is_waited_out_up_to_the_deadline(httpx_mock: HTTPXMock) -> None:
    """Issue 20: a kick-off 429 went through the generic retry budget with its wait capped at
    http.retry_max_wait (here 30 s); the server's Retry-After is honoured in full instead
    (pfsync.http.KICKOFF_RULES), as long as the export deadline allows."""
    clock = FakeClock()
    httpx_mock.add_response(
        status_code=429, headers={"Retry-After": "1000"}, json=outcome("later", "throttled")
    )
    httpx_mock.add_response(status_code=202, headers={"Content-Location": STATUS})
    with httpx.Client() as client:
        url = kickoff(client, None, BASE, ExportRequest(), policy=POLICY, clock=clock,
                      deadline_at=clock.now() + 3600)  # fmt: skip
    assert url == STATUS and clock.slept == pytest.approx(1000)


def test_kickoff_429_past_the_deadline_is_temporary_at_once(httpx_mock: HTTPXMock) -> None:
    clock = FakeClock()
    httpx_mock.add_response(
        status_code=429, headers={"Retry-After": "1000"}, json=outcome("later", "throttled")
    )
    with httpx.Client() as client, pytest.raises(HTTPError, match="export deadline") as info:
        kickoff(
            client, None, BASE, ExportRequest(), policy=POLICY, clock=clock, deadline_at=clock.now() + 600
        )
    assert info.value.temporary and info.value.exit_code == 75 and clock.slept == 0


@pytest.mark.parametrize(
    ("status", "error"), [(400, ExportError), (500, ExportError), (401, AuthError), (403, AuthError)]
)
def test_kickoff_refused_raises_with_outcome_text(httpx_mock: HTTPXMock, status: int, error: type) -> None:
    httpx_mock.add_response(status_code=status, json=outcome("File generation failed"))
    with httpx.Client() as client, pytest.raises(error, match="File generation failed"):
        kickoff(client, None, BASE, ExportRequest(), policy=POLICY, clock=FakeClock())


def test_kickoff_202_without_content_location_is_an_export_error(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(status_code=202)
    with httpx.Client() as client, pytest.raises(ExportError, match="Content-Location"):
        kickoff(client, None, BASE, ExportRequest(), policy=POLICY, clock=FakeClock())


def test_kickoff_503_past_retries_is_temporary(httpx_mock: HTTPXMock) -> None:
    for _ in range(POLICY.retries + 1):
        httpx_mock.add_response(status_code=503, json=outcome("busy", "transient"))
    with httpx.Client() as client, pytest.raises(HTTPError) as info:
        kickoff(client, None, BASE, ExportRequest(), policy=POLICY, clock=FakeClock())
    assert info.value.temporary


def make_poller(client: httpx.Client, clock: FakeClock, sink: ListSink, **settings: Any) -> Poller:
    return Poller(client, None, ExportSettings(**settings), POLICY, clock, sink)


def test_poll_honours_retry_after_and_reports_x_progress(httpx_mock: HTTPXMock) -> None:
    clock, sink = FakeClock(), ListSink()
    httpx_mock.add_response(status_code=202, headers={"Retry-After": "3", "X-Progress": "21% complete"})
    date = email.utils.formatdate(clock.now() + 3 + 5, usegmt=True)
    httpx_mock.add_response(status_code=202, headers={"Retry-After": date, "X-Progress": "76% complete"})
    httpx_mock.add_response(json=manifest_body())
    with httpx.Client() as client:
        manifest = make_poller(client, clock, sink).poll(STATUS, deadline_at=clock.now() + 3600)
    assert manifest.transaction_time == "2026-01-02T03:04:05Z"
    assert [e["progress"] for e in sink.of("status_progress")] == ["21% complete", "76% complete"]
    first, second = (e["retryIn"] for e in sink.of("status_progress"))
    assert first == 3
    assert 4 <= second <= 5.5  # the HTTP-date form, relative to the (fake) clock
    assert clock.slept == pytest.approx(first + second)
    assert httpx_mock.get_requests()[0].headers["Accept"] == "application/json"


def test_poll_clamps_retry_after_to_poll_max_wait(httpx_mock: HTTPXMock) -> None:
    clock, sink = FakeClock(), ListSink()
    httpx_mock.add_response(status_code=202, headers={"Retry-After": "86400"})
    httpx_mock.add_response(json=manifest_body())
    with httpx.Client() as client:
        make_poller(client, clock, sink, poll_max_wait=60).poll(STATUS, deadline_at=clock.now() + 1e6)
    assert clock.slept == 60


def test_poll_without_retry_after_backs_off_progressively(httpx_mock: HTTPXMock) -> None:
    clock, sink = FakeClock(), ListSink()
    for _ in range(40):
        httpx_mock.add_response(status_code=202)
    httpx_mock.add_response(json=manifest_body())
    with httpx.Client() as client:
        make_poller(client, clock, sink, poll_max_wait=4).poll(STATUS, deadline_at=clock.now() + 1e6)
    waits = [e["retryIn"] for e in sink.of("status_progress")]
    assert waits == sorted(waits) and waits[0] < waits[-1]
    assert waits[0] == 0.5 and max(waits) == 4  # starts small, capped by export.poll_max_wait


def test_poll_schedule_is_quick_while_young_then_stays_under_half_the_rate_limit() -> None:
    """Issue 20: within a second of the server finishing for a ~15 s job, yet two clients behind
    one address stay under the reference server's 60 polls a minute per route."""
    elapsed, polls_at = 0.0, [0.0]
    while elapsed < 3600:
        pause = poll_wait(elapsed, None, 300)
        if elapsed < 15:
            assert pause <= 1.0
        assert pause <= max(1.0, elapsed * 0.2)  # a long job waits at most a fifth longer
        elapsed += pause
        polls_at.append(elapsed)
    for minute in range(60):
        assert sum(minute * 60 <= t < (minute + 1) * 60 for t in polls_at) < 30, minute
    # The reference server's Retry-After: 1 on every 202 is a minimum, not a rate to keep up forever.
    assert poll_wait(120, 1.0, 300) > 5 and poll_wait(3, 7.0, 300) == 7.0 and poll_wait(3, 900, 60) == 60


def _slow_status_server(httpx_mock: HTTPXMock, clock: FakeClock, answer_seconds: list[float]) -> list[float]:
    """202s that each take answer_seconds[i] (FakeClock time) to arrive, then the manifest; returns the
    clock times at which the polls were sent."""
    sent: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now())
        if len(sent) > len(answer_seconds):
            return httpx.Response(200, json=manifest_body())
        clock.t += answer_seconds[len(sent) - 1]
        return httpx.Response(202)

    httpx_mock.add_callback(answer, is_reusable=True)
    return sent


def test_poll_schedule_is_anchored_to_when_polls_were_due_not_to_slow_answers(httpx_mock: HTTPXMock) -> None:
    """A busy server that takes 0.3 s per answer must not push every later poll back: after 20
    polls the drift would be 6 s, and a job that finished would wait up to a second more."""
    clock, sink = FakeClock(), ListSink()
    sent = _slow_status_server(httpx_mock, clock, [0.3] * 20)
    start = clock.now()
    with httpx.Client() as client:
        make_poller(client, clock, sink).poll(STATUS, deadline_at=clock.now() + 3600, started_at=start)
    expected, elapsed = [0.0], 0.0
    while len(expected) < len(sent):
        elapsed += poll_wait(elapsed, None, 300)
        expected.append(elapsed)
    assert [round(t - start, 6) for t in sent] == [round(t, 6) for t in expected]


def test_poll_after_a_late_answer_polls_once_at_once_then_keeps_the_schedule(httpx_mock: HTTPXMock) -> None:
    """An answer that takes longer than the schedule's pause is followed by one poll at once, not by
    a burst of polls catching up the ones it delayed (the reference server's rate limit)."""
    clock, sink = FakeClock(), ListSink()
    sent = _slow_status_server(httpx_mock, clock, [0.0, 0.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    start = clock.now()
    with httpx.Client() as client:
        make_poller(client, clock, sink).poll(STATUS, deadline_at=clock.now() + 3600, started_at=start)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sent)]
    assert gaps[2] == 6.0  # the late answer, then the next poll at once
    assert all(gap >= 1.0 for gap in gaps[3:]), gaps  # then the schedule's pauses again, no burst


def test_poll_deadline_raises_export_error(httpx_mock: HTTPXMock) -> None:
    clock, sink = FakeClock(), ListSink()
    httpx_mock.add_response(status_code=202, headers={"Retry-After": "100"}, is_reusable=True)
    with httpx.Client() as client, pytest.raises(ExportError, match=r"deadline") as info:
        make_poller(client, clock, sink, deadline=250).poll(STATUS, deadline_at=clock.now() + 250)
    assert "run the same command again" in (info.value.hint or "")
    assert clock.slept <= 250


def test_poll_keeps_polling_through_transient_500s_past_the_retry_budget(httpx_mock: HTTPXMock) -> None:
    """Issue 20, docs/bulk-data.md, recorded case 50: the reference server answers 500 `transient` on every poll until the
    job completes: the export deadline is the limit, not http.retries."""
    clock, sink = FakeClock(), ListSink()
    for _ in range(POLICY.retries * 3):
        httpx_mock.add_response(status_code=500, json=outcome("An unknown error occurred", "transient"))
    httpx_mock.add_response(json=manifest_body())
    with httpx.Client() as client:
        manifest = make_poller(client, clock, sink).poll(STATUS, deadline_at=clock.now() + 3600)
    assert manifest.transaction_time == "2026-01-02T03:04:05Z"
    errors = sink.of("status_error")
    assert len(errors) == POLICY.retries * 3 and {e["status"] for e in errors} == {500}


def test_poll_transient_500s_stop_at_the_export_deadline(httpx_mock: HTTPXMock) -> None:
    clock, sink = FakeClock(), ListSink()
    httpx_mock.add_response(status_code=500, json=outcome("busy", "transient"), is_reusable=True)
    with httpx.Client() as client, pytest.raises(ExportError, match="deadline") as info:
        make_poller(client, clock, sink, deadline=120).poll(STATUS, deadline_at=clock.now() + 120)
    assert "run the same command again" in (info.value.hint or "")


def test_poll_past_retries_says_that_a_rerun_resumes_the_job(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(status_code=503, json=outcome("busy", "exception"), is_reusable=True)
    with httpx.Client() as client, pytest.raises(HTTPError) as info:
        make_poller(client, FakeClock(), ListSink()).poll(STATUS, deadline_at=1e12)
    assert info.value.exit_code == 75 and "run the same command again" in (info.value.hint or "")


@pytest.mark.parametrize("status", [500, 400])
def test_poll_failed_export_raises_with_outcome_text(httpx_mock: HTTPXMock, status: int) -> None:
    clock, sink = FakeClock(), ListSink()
    httpx_mock.add_response(status_code=status, json=outcome("Export failed: disk full", "exception"))
    with httpx.Client() as client, pytest.raises(ExportError, match="disk full") as info:
        make_poller(client, clock, sink).poll(STATUS, deadline_at=clock.now() + 3600)
    assert info.value.exit_code == 5
    assert sink.of("status_error")[0]["message"] == "Export failed: disk full"


@pytest.mark.parametrize("status", [404, 410])
def test_poll_gone_status_url_is_an_expired_job(httpx_mock: HTTPXMock, status: int) -> None:
    httpx_mock.add_response(status_code=status, json=outcome("The export was not found", "not-found"))
    with httpx.Client() as client, pytest.raises(JobExpired):
        make_poller(client, FakeClock(), ListSink()).poll(STATUS, deadline_at=1e12)


def test_poll_stops_waiting_when_stop_is_set(httpx_mock: HTTPXMock) -> None:
    import threading

    stop = threading.Event()
    clock = FakeClock()
    httpx_mock.add_response(status_code=202, headers={"Retry-After": "30"})
    stop.set()
    with httpx.Client() as client, pytest.raises(InterruptedRunError):
        Poller(client, None, ExportSettings(), POLICY, clock, ListSink(), stop).poll(STATUS, deadline_at=1e12)


def test_parse_manifest_reads_output_error_deleted_and_next_link() -> None:
    body = manifest_body(
        error=[{"type": "OperationOutcome", "url": "err/1"}],
        deleted=[{"type": "Bundle", "url": f"{BASE}/Binary/del/1", "count": 5}],
        link=[{"relation": "next", "url": f"{STATUS}?page=2"}],
        requiresAccessToken=False,
    )
    manifest = parse_manifest(body, STATUS)
    assert [(f.kind, f.type, f.count) for f in manifest.files] == [
        ("output", "Patient", 2), ("error", "OperationOutcome", None), ("deleted", "Bundle", 5)]  # fmt: skip
    assert manifest.files[1].url == f"{BASE}/Export/err/1"  # resolved against the page URL
    assert manifest.next_url == f"{STATUS}?page=2"
    assert manifest.requires_access_token is False


@pytest.mark.parametrize(
    "body",
    [{}, {"transactionTime": "x", "output": "nope"}, {"transactionTime": "x", "output": [{"type": "P"}]}],
)
def test_parse_manifest_rejects_malformed(body: dict[str, Any]) -> None:
    with pytest.raises(ExportError):
        parse_manifest(body, STATUS)


def test_delete_job_accepts_202_and_treats_404_as_gone(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(
        method="DELETE", status_code=202, json=outcome("canceled", severity="information")
    )
    httpx_mock.add_response(method="DELETE", status_code=404, json=outcome("not found", "not-found"))
    with httpx.Client() as client:
        assert delete_job(client, None, STATUS, policy=POLICY, clock=FakeClock()) is True
        assert delete_job(client, None, STATUS, policy=POLICY, clock=FakeClock()) is False


@pytest.mark.parametrize(
    ("level", "groups", "expected"),
    [("auto", (), [("patient", None)]), ("auto", ("a", "b"), [("group", "a"), ("group", "b")]),
     ("system", (), [("system", None)]), ("patient", ("a",), [("patient", None)])],
)  # fmt: skip
def test_requests_for_resolves_level_and_one_request_per_group(
    level: Any, groups: tuple[str, ...], expected: list[tuple[str, str | None]]
) -> None:
    src = SourceSettings(
        name="s", base_url=BASE, export_level=level, groups=groups, resource_types=("Patient",)
    )
    found = requests_for(src, ExportSettings(kickoff_method="post"), since="2026-01-01T00:00:00Z")
    assert [(r.level, r.group_id) for r in found] == expected
    # issue 20: a system export holds the server's Groups too
    types = ("Patient", "Group") if level == "system" else ("Patient",)
    assert all(r.method == "post" and r.types == types and r.since for r in found)


def test_export_request_round_trips_and_fingerprint_is_stable() -> None:
    req = ExportRequest(level="group", group_id="g", types=("A", "B"), type_filters=("A?x=1",))
    assert ExportRequest.from_json(orjson.loads(orjson.dumps(req.to_json()))) == req
    assert req.fingerprint() == ExportRequest.from_json(req.to_json()).fingerprint()
    assert req.fingerprint() != ExportRequest(level="patient").fingerprint()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [(f"{BASE}/Binary/1", True), ("https://EHR.example:443/other", True), ("https://storage.example/f", False),
     ("http://ehr.example/fhir", False), ("https://cdn.example:8443/x", True)],
)  # fmt: skip
def test_origins_only_allow_source_and_allowlist(url: str, allowed: bool) -> None:
    auth = httpx.BasicAuth("u", "p")
    origins = Origins(BASE, ["https://cdn.example:8443"])
    assert (origins.auth_for(url, auth) is auth) is allowed


def test_issues_of_classifies_severity() -> None:
    found = issues_of(outcome("boom", severity="fatal")) + issues_of(outcome("meh", severity="warning"))
    assert [(i.severity, i.fatal) for i in found] == [("fatal", True), ("warning", False)]
    assert issues_of({"resourceType": "Patient"})[0].fatal


def test_poll_413_too_many_files_is_a_failed_export_with_its_text(httpx_mock: HTTPXMock) -> None:
    """Transcript 57: the reference server's "Too many files" is a 413 text/html at the status URL."""
    httpx_mock.add_response(status_code=413, text="Too many files", headers={"Content-Type": "text/html"})
    with httpx.Client() as client, pytest.raises(ExportError, match="Too many files") as info:
        make_poller(client, FakeClock(), ListSink()).poll(STATUS, deadline_at=1e12)
    assert info.value.exit_code == 5


def test_types_the_server_lacks_are_named_apart_from_types_not_granted() -> None:
    """Issue 20: types left out of the token request because the server does not have them are not
    "not granted" (no admin can grant them); only the types not granted fail with strict scopes."""
    request = ExportRequest(types=("Patient", "Medication", "Condition", "Observation"))
    kept, lacking, refused = narrow_to_granted(request, ["Patient", "Observation"], ["Medication"], False)
    assert kept.types == ("Patient", "Observation")
    assert lacking == "the server does not have Medication (left out of the token request)"
    assert refused == "the token's scope does not grant Condition"
    assert narrow_to_granted(request, ["Patient", "Observation", "Condition"], ["Medication"], True)[2] == ""
    with pytest.raises(AuthError, match="does not grant Condition"):
        narrow_to_granted(request, ["Patient", "Observation"], ["Medication"], True)
    with pytest.raises(AuthError, match="nothing left to export"):
        narrow_to_granted(request, [], ["Medication"], False)
