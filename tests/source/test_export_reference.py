"""Integration tests of issue 20: what the SMART reference Bulk Data server does that Practice
Fusion's documentation does not mention, imitated by the source sandbox, against run_export over
real HTTP. The sandbox and pfsync share one FakeClock, so minutes of polling take no real time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from doubles import ListSink
from test_export_fakes import FakeClock, SandboxAuth

from pfsync.core.errors import AuthError, ConfigError, ExportError, HTTPError
from pfsync.core.redact import Secret
from pfsync.core.settings import ExportSettings, Settings, SourceSettings
from pfsync.net.http import RetryPolicy
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.source.auth import source_auth
from pfsync.source.bulk import ExportRequest, requests_for
from pfsync.source.export import ExportResult, run_export
from pfsync.sync.authcheck import run_auth_test

pytestmark = pytest.mark.integration

TYPES = ("Patient", "Condition", "Encounter")
SMALL = {"Patient": 17, "Condition": 86, "Encounter": 431}  # fixtures/README.md synthea-small
POLICY = RetryPolicy(retries=4, base=0.01)


def run(
    sandbox: SourceSandbox,
    out: Path,
    request: ExportRequest | None = None,
    *,
    clock: FakeClock | None = None,
    events: ListSink | None = None,
    settings: ExportSettings | None = None,
) -> ExportResult:
    clock = clock or FakeClock(start=time.time())
    sandbox.use_clock(clock.now)
    src = SourceSettings(name="sandbox", base_url=sandbox.base_url(), client_id="pfsync-sandbox",
                         client_secret=Secret("sandbox-secret"))  # fmt: skip
    with httpx.Client(timeout=30) as client:
        _, auth = source_auth(src, client, clock=clock)
        return run_export(src, settings or ExportSettings(), client, auth, out_dir=out,
                          request=request or ExportRequest(level="patient", types=TYPES), clock=clock,
                          events=events, policy=POLICY)  # fmt: skip


def status_polls(sandbox: SourceSandbox) -> list[int]:
    return [s.status for s in sandbox.stats.requests("status")]


def test_transient_500_on_every_poll_keeps_polling_until_the_job_completes(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """Issue 20, docs/bulk-data.md, recorded case 50: 500 `transient` on every poll for two minutes; the export completes."""
    source.faults.busy_export(seconds=120, transient=True)
    events = ListSink()
    result = run(source, tmp_path / "out", events=events)
    polls = status_polls(source)
    assert polls[-1] == 200 and set(polls[:-1]) == {500}
    assert len(polls) - 1 > POLICY.retries * 3  # far past the retry budget
    assert {f.type: f.lines for f in result.files} == SMALL
    assert events.of("status_error")[0]["status"] == 500


def test_polling_stays_under_half_the_reference_servers_rate_limit(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """Issue 20: 60 polls a minute per route, then 429 for 5 minutes with an epoch-ms Retry-After.
    With `Retry-After: 1` on every 202 (the reference server's), a 4-minute job is polled less than
    30 times in any minute, so a second client behind the same address fits too: no 429 at all."""
    clock = FakeClock(start=time.time())
    source.configure(rate_limit=60)
    source.faults.busy_export(seconds=240, retry_after=1)
    run(source, tmp_path / "out", clock=clock)
    polls = source.stats.requests("status")
    assert 429 not in {s.status for s in polls}
    assert len(polls) < 60  # 4 minutes at the server's Retry-After: 1 would be ~240 polls


def test_slow_status_answers_do_not_push_the_polls_back(source: SourceSandbox, tmp_path: Path) -> None:
    """Issue 20: each status answer takes 0.3 s (on the shared FakeClock). The polls stay on the
    schedule, at most a second apart while the job is young, so the job is asked about at most a
    second after it finished (counting each pause from the answer made them 1.3 s apart)."""
    clock = FakeClock(start=time.time())
    source.use_clock(clock.now)
    source.faults.busy_export(seconds=12, retry_after=None)
    kicked: list[float] = []
    polled: list[float] = []

    def on_request(request: httpx.Request) -> None:
        if request.url.path.endswith("/$export"):
            kicked.append(clock.now())
        elif "/Export/" in request.url.path and request.method == "GET":
            polled.append(clock.now())

    def on_response(response: httpx.Response) -> None:
        if "/Export/" in response.request.url.path:
            clock.t += 0.3  # the answer's time

    src = SourceSettings(name="sandbox", base_url=source.base_url(), client_id="pfsync-sandbox",
                         client_secret=Secret("sandbox-secret"))  # fmt: skip
    hooks: dict[str, list[Callable[..., Any]]] = {"request": [on_request], "response": [on_response]}
    with httpx.Client(timeout=30, event_hooks=hooks) as client:
        _, auth = source_auth(src, client, clock=clock)
        result = run_export(src, ExportSettings(), client, auth, out_dir=tmp_path / "out",
                            request=ExportRequest(level="patient", types=TYPES), clock=clock, policy=POLICY)  # fmt: skip
    assert {f.type: f.lines for f in result.files} == SMALL
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(polled)]
    assert gaps[:2] == [0.5, 0.75] and set(gaps[2:]) == {1.0}, gaps  # poll_wait's schedule, exactly
    ready = kicked[0] + 12
    assert polled[-2] < ready <= polled[-1] <= ready + 1.0


def test_a_blocked_route_is_waited_out_with_the_epoch_millisecond_retry_after(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """The sandbox's limiter: past the limit, 429 with Retry-After in epoch ms (then epoch s) for
    the block; pfsync waits it out (export.poll_max_wait >= the block) and completes."""
    clock = FakeClock(start=time.time())
    source.configure(rate_limit=10, rate_block=200)
    source.faults.busy_export(seconds=12, retry_after=1)
    events = ListSink()
    run(source, tmp_path / "out", clock=clock, events=events)
    limited = [s for s in source.stats.requests("status") if s.status == 429]
    assert len(limited) == 1 and source.stats.requests("status")[-1].status == 200
    waits = [e["retryIn"] for e in events.of("status_error") if e["status"] == 429]
    assert len(waits) == 1 and 199 <= waits[0] <= 201  # the epoch-ms value read as an absolute time


def test_a_kickoff_put_off_for_longer_than_the_retry_budget_is_waited_out(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """Issue 20: the kick-off route is past its limit and blocked for 1,000 s (epoch-ms, then
    epoch-s Retry-After). The generic retry budget (4 retries of at most 120 s here) gave up while
    the server was still asking for patience; the kick-off waits it out within the export deadline."""
    clock = FakeClock(start=time.time())
    source.use_clock(clock.now)
    source.configure(rate_limit=1, rate_block=1000)
    token = SandboxAuth(source.token_url()).current()
    first = httpx.get(source.base_url() + "/Patient/$export", headers={"Authorization": f"Bearer {token}",
                      "Accept": "application/fhir+json", "Prefer": "respond-async"})  # fmt: skip
    assert first.status_code == 202  # another client used the route's budget
    started = clock.now()
    result = run(source, tmp_path / "out", clock=clock)
    # The whole block in one wait:
    assert [s.status for s in source.stats.requests("kickoff")] == [202, 429, 202]
    assert {f.type: f.lines for f in result.files} == SMALL
    assert clock.now() - started >= 1000


def test_a_kickoff_put_off_past_the_export_deadline_fails_as_temporary(
    source: SourceSandbox, tmp_path: Path
) -> None:
    clock = FakeClock(start=time.time())
    source.use_clock(clock.now)
    source.configure(rate_limit=1, rate_block=1000)
    token = SandboxAuth(source.token_url()).current()
    httpx.get(source.base_url() + "/Patient/$export", headers={"Authorization": f"Bearer {token}",
              "Accept": "application/fhir+json", "Prefer": "respond-async"})  # fmt: skip
    with pytest.raises(HTTPError, match="export deadline") as info:
        run(source, tmp_path / "out", clock=clock, settings=ExportSettings(deadline=600))
    assert (
        info.value.exit_code == 75
        and clock.sleeps == []
        and "PFSYNC_EXPORT_DEADLINE" in (info.value.hint or "")
    )


def test_a_retry_after_already_past_gets_a_backoff(source: SourceSandbox, tmp_path: Path) -> None:
    """Issue 20: a 429 whose absolute Retry-After lies in the past (an hour ago: a server whose
    clock is behind) was retried at once, 0 s later; it now waits the retry backoff."""
    clock = _ThreadClock(start=time.time())
    source.faults.rate_limit("download", times=2, retry_after=-3600, http_date=True)
    result = run(source, tmp_path / "out", clock=clock)
    assert {f.type: f.lines for f in result.files} == SMALL
    assert sum(s.status == 429 for s in source.stats.requests("download")) == 2
    waits = [seconds for seconds, thread in clock.by_thread if thread.startswith("download")]
    assert len(waits) == 2 and all(w > 0 for w in waits)


class _ThreadClock(FakeClock):
    """A FakeClock that notes which thread slept (download workers vs the poller)."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.by_thread: list[tuple[float, str]] = []

    def sleep(self, seconds: float) -> None:
        self.by_thread.append((seconds, threading.current_thread().name))
        super().sleep(seconds)


def test_rate_limiter_answers_like_the_reference_server(source: SourceSandbox) -> None:
    now = [1_800_000_000.0]
    source.use_clock(lambda: now[0])
    source.configure(rate_limit=2)
    url = source.base_url() + "/Patient/$export"
    answers = [httpx.get(url) for _ in range(4)]
    assert [a.status_code for a in answers] == [401, 401, 429, 429]  # limited before auth
    assert answers[2].text == "Too Many Requests. Try again later."
    assert int(answers[2].headers["retry-after"]) == (now[0] + 300) * 1000  # epoch ms first
    assert int(answers[3].headers["retry-after"]) == now[0] + 300  # then epoch seconds
    now[0] += 301
    assert httpx.get(url).status_code == 401


def test_export_completes_within_a_second_of_the_server_finishing(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """Issue 20 criterion 3: a 15 s job with no Retry-After (Practice Fusion's 202s have none)."""
    clock = FakeClock(start=time.time())
    source.faults.busy_export(seconds=15, retry_after=None)
    started = clock.now()
    run(source, tmp_path / "out", clock=clock)
    finished_polling = sum(clock.sleeps)  # every sleep of this run was a poll wait
    assert 15 <= clock.now() - started == pytest.approx(finished_polling)
    assert finished_polling <= 16


def test_count_mismatch_costs_one_re_download_and_one_warning(source: SourceSandbox, tmp_path: Path) -> None:
    """Issue 20: the manifest announces 1,000 more Conditions than the file holds. An identical
    second download proves the file is what the server has: kept, reported once."""
    source.faults.wrong_count(type="Condition")
    events = ListSink()
    result = run(source, tmp_path / "out", events=events)
    downloads = [s.url for s in source.stats.requests("download") if "/Condition/" in s.url]
    assert len(downloads) == 2
    assert [f.lines for f in result.files if f.type == "Condition"] == [SMALL["Condition"]]
    assert result.problems == (f"Condition.1.ndjson: {SMALL['Condition']} lines but the manifest announced "
                               f"{SMALL['Condition'] + 1000}",)  # fmt: skip
    assert len([e for e in events.of("download_error") if e["name"] == "Condition.1.ndjson"]) == 1


def test_error_entries_with_counts_are_not_count_checked_and_their_issues_are_saved(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """Issue 20, docs/bulk-data.md, recorded case 52: error[] entries carry the failed file's count; the error file is one
    OperationOutcome. Downloaded once, no count warning; the export fails (exit 5) and the saved
    manifest lists the fatal issues."""
    source.faults.failed_files(types=("Condition", "Encounter"))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="Failed to export") as info:
        run(source, out)
    assert info.value.exit_code == 5
    errors = [s for s in source.stats.requests("download") if "/error/" in s.url]
    assert len(errors) == 2  # one download each, despite count 86 / 431 against one line
    saved = orjson.loads((out / "manifest.json").read_bytes())
    assert len(saved["issues"]) == 2 and {i["severity"] for i in saved["issues"]} == {"error"}
    assert not [p for p in saved["problems"] if "announced" in p]
    assert orjson.loads((out / "job.json").read_bytes())["state"] == "failed"


def test_expired_files_delete_both_jobs_and_mark_the_export_failed(
    source: SourceSandbox, tmp_path: Path
) -> None:
    """Issue 20, docs/bulk-data.md, recorded case 53: every download answers 410; pfsync starts one new export, which
    expires as well: both jobs are DELETEd and job.json says failed."""
    source.faults.file_expired(times=2)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="expired as well"):
        run(source, out)
    assert [s.status for s in source.stats.requests("delete")] == [202, 202]
    assert orjson.loads((out / "job.json").read_bytes())["state"] == "failed"


@pytest.mark.parametrize("mode", ["not-found", "empty"])
def test_unknown_group_is_a_configuration_error(source: SourceSandbox, tmp_path: Path, mode: str) -> None:
    """Issue 20, docs/bulk-data.md, recorded case 23: the reference server exports an unknown group as nothing ("empty");
    our reading of Practice Fusion answers 404. Either way: exit 3 naming the group, job DELETEd."""
    source.configure(unknown_group=mode)
    with pytest.raises(ConfigError, match="'NoSuchGroup' does not exist") as info:
        run(source, tmp_path / "out", ExportRequest(level="group", group_id="NoSuchGroup", types=TYPES))
    assert info.value.exit_code == 3
    kicked = [s.status for s in source.stats.requests("kickoff")]
    assert kicked == ([202] if mode == "empty" else [404])
    assert [s.status for s in source.stats.requests("delete")] == ([202] if mode == "empty" else [])


def test_empty_group_that_exists_is_a_warning_only(source: SourceSandbox, tmp_path: Path) -> None:
    source.add_to_group("empty-group", [])
    result = run(source, tmp_path / "out", ExportRequest(level="group", group_id="empty-group", types=TYPES))
    assert result.files == () and any("exported nothing" in w for w in result.warnings)


DEFAULT_TYPES = SourceSettings(name="x", base_url="https://x").resource_types
NOT_IN_SMALL = ["AllergyIntolerance", "Medication", "MedicationStatement", "DocumentReference", "ServiceRequest",
                "Binary"]  # fmt: skip


def _settings(sandbox: SourceSandbox, **kw: Any) -> SourceSettings:
    return SourceSettings(name="sandbox", base_url=sandbox.base_url(), client_id="pfsync-sandbox",
                          client_secret=Secret("sandbox-secret"), **kw)  # fmt: skip


def test_types_the_server_does_not_have_are_dropped_from_the_scope(source: SourceSandbox) -> None:
    """Issue 20: like the reference server, the sandbox refuses the whole token for a type it does
    not hold (400 invalid_scope 'Resources of type "Medication" do not exist on this server').
    pfsync drops the types the refusal names, says which, and gets a token for the rest."""
    source.configure(scope_types="data")
    with httpx.Client(timeout=30) as client:
        authn, _ = source_auth(_settings(source), client)
        authn.token()
    assert sorted(authn.unsupported_types) == sorted(NOT_IN_SMALL)
    assert authn.types == [t for t in DEFAULT_TYPES if t not in NOT_IN_SMALL]
    granted, missing = authn.granted_types(DEFAULT_TYPES)
    assert sorted(missing) == sorted(NOT_IN_SMALL) and "Patient" in granted


def test_strict_scopes_keeps_the_refusal(source: SourceSandbox) -> None:
    source.configure(scope_types="data")
    with httpx.Client(timeout=30) as client, pytest.raises(AuthError, match="Medication") as info:
        source_auth(_settings(source), client, negotiate=False)[0].token()
    assert info.value.exit_code == 4


def test_types_missing_from_the_capability_statement_are_dropped_when_the_refusal_names_none(
    source: SourceSandbox,
) -> None:
    """A server whose invalid_scope text names no type: the CapabilityStatement says what it has."""
    source.configure(scope_types="data")
    with httpx.Client(timeout=30) as client:
        authn, _ = source_auth(
            _settings(source, resource_types=("Patient", "Medication", "Condition")), client
        )
        real = authn._request_token

        def anonymous(scopes: Any) -> httpx.Response:
            response = real(scopes)
            if response.status_code != 400:
                return response
            return httpx.Response(400, json={"error": "invalid_scope", "error_description": "bad scope"},
                                  request=response.request)  # fmt: skip

        authn._request_token = anonymous  # type: ignore[method-assign]
        authn.token()
    assert authn.unsupported_types == ["Medication"] and authn.types == ["Patient", "Condition"]


def test_export_with_the_default_types_against_a_server_that_lacks_some(
    source: SourceSandbox, tmp_path: Path
) -> None:
    source.configure(scope_types="data")
    src = _settings(source)
    clock = FakeClock(start=time.time())
    with httpx.Client(timeout=30) as client:
        authn, auth = source_auth(src, client, clock=clock)
        authn.token()
        granted = authn.granted_types(src.resource_types)[0]
        result = run_export(src, ExportSettings(), client, auth, out_dir=tmp_path / "out",
                            request=requests_for(src, ExportSettings())[0], clock=clock, policy=POLICY,
                            granted_types=granted)  # fmt: skip
    assert {f.type for f in result.files} >= set(SMALL)
    assert any("Medication" in w for w in result.warnings)


def test_system_level_export_includes_the_groups(source: SourceSandbox, tmp_path: Path) -> None:
    """Issue 20: a system-level export with a type list that names no Group left the server's
    Groups out. Group is added to the scope and to _type at system level."""
    source.configure(system_export=True)
    src = _settings(source, export_level="system", resource_types=TYPES)
    clock = FakeClock(start=time.time())
    with httpx.Client(timeout=30) as client:
        authn, auth = source_auth(src, client, clock=clock)
        authn.token()
        request = requests_for(src, ExportSettings())[0]
        result = run_export(src, ExportSettings(), client, auth, out_dir=tmp_path / "out", request=request,
                            clock=clock, policy=POLICY, granted_types=authn.granted_types(src.resource_types)[0])  # fmt: skip
    assert "system/Group.rs" in authn.requested_scopes and request.types == (*TYPES, "Group")
    groups = [f for f in result.files if f.type == "Group"]
    assert sum(f.lines for f in groups) == len(source.groups()) > 0
    assert not result.warnings


@pytest.mark.parametrize("strict", [False, True])
def test_auth_test_names_the_types_the_server_does_not_have(source: SourceSandbox, strict: bool) -> None:
    source.configure(scope_types="data")
    settings = Settings(sources=(_settings(source),), export=ExportSettings(strict_scopes=strict))
    with httpx.Client(timeout=30) as client:
        report = run_auth_test(settings, client, include_medplum=False)
    checks = {c.name: c for c in report.targets[0].checks}
    if strict:  # today's refusal, kept
        assert checks["token"].status == "fail" and "Medication" in checks["token"].detail
    else:
        assert checks["token"].status == "ok" and checks["types_unsupported"].status == "warn"
        assert all(t in checks["types_unsupported"].detail for t in NOT_IN_SMALL)
