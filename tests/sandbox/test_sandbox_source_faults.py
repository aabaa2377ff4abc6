"""Source sandbox fault injection: each fault armed through Python (and one through the control API)."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx
import orjson
import pytest
from source_fixtures import export_and_wait, kickoff_headers, source_token

from pfsync.sandbox.source.server import SourceSandbox

pytestmark = pytest.mark.integration


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _kickoff(source: SourceSandbox, token: str, **params: str) -> httpx.Response:
    return httpx.get(source.base_url() + "/Patient/$export", params=params, headers=kickoff_headers(token))


@pytest.mark.parametrize("http_date", [False, True])
def test_fault_rate_limit_kickoff_both_retry_after_forms(source: SourceSandbox, http_date: bool) -> None:
    token = source_token(source)
    source.faults.rate_limit("kickoff", times=1, retry_after=3, http_date=http_date)
    resp = _kickoff(source, token)
    assert resp.status_code == 429
    value = resp.headers["retry-after"]
    if http_date:
        assert parsedate_to_datetime(value).tzinfo is not None
    else:
        assert value == "3"
    assert _kickoff(source, token).status_code == 202  # armed for one request only


def test_fault_rate_limit_status_and_download(source: SourceSandbox) -> None:
    token = source_token(source)
    status_url, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    source.faults.rate_limit("status")
    source.faults.rate_limit("download")
    assert httpx.get(status_url, headers=_auth(token)).status_code == 429
    assert httpx.get(manifest["output"][0]["url"], headers=_auth(token)).status_code == 429
    assert httpx.get(manifest["output"][0]["url"], headers=_auth(token)).status_code == 200


@pytest.mark.parametrize("status", [500, 503])
def test_fault_server_error_always_until_cleared(source: SourceSandbox, status: int) -> None:
    token = source_token(source)
    source.faults.server_error("kickoff", times=None, status=status)
    assert [_kickoff(source, token).status_code for _ in range(3)] == [status] * 3
    source.faults.clear()
    assert _kickoff(source, token).status_code == 202


def test_fault_server_error_on_token(source: SourceSandbox) -> None:
    source.faults.server_error("token")
    with pytest.raises(httpx.HTTPStatusError):
        source_token(source)


def test_fault_slow_export_progress_and_retry_after(source: SourceSandbox) -> None:
    token = source_token(source)
    source.faults.slow_export(polls=3, retry_after=2)
    url = _kickoff(source, token, _type="Patient").headers["content-location"]
    polls = [httpx.get(url, headers=_auth(token)) for _ in range(4)]
    assert [p.status_code for p in polls] == [202, 202, 202, 200]
    assert all(p.headers["retry-after"] == "2" and "complete" in p.headers["x-progress"] for p in polls[:3])


def test_fault_reset_download_mid_file(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    source.faults.reset_download(after_bytes=1000)
    with pytest.raises(httpx.TransportError):
        httpx.get(manifest["output"][0]["url"], headers=_auth(token))
    assert httpx.get(manifest["output"][0]["url"], headers=_auth(token)).status_code == 200


def test_fault_truncated_file_ends_mid_line(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    source.faults.truncate_download(type="Patient")
    body = httpx.get(manifest["output"][0]["url"], headers=_auth(token)).content
    assert not body.endswith(b"\n")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body.rsplit(b"\n", 1)[1])


def test_fault_malformed_line(source: SourceSandbox) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    source.faults.malformed_line()
    lines = httpx.get(manifest["output"][0]["url"], headers=_auth(token)).content.splitlines()
    bad = 0
    for line in lines:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
    assert bad == 1 and len(lines) == 18


@pytest.mark.parametrize("bundle", [False, True])
def test_fault_pretty_json_file(source: SourceSandbox, bundle: bool) -> None:
    token = source_token(source)
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    source.faults.pretty_json(bundle=bundle)
    resp = httpx.get(manifest["output"][0]["url"], headers=_auth(token))
    assert resp.headers["content-type"] == "application/json"  # docs/practice-fusion.md: their example
    doc = resp.json()
    assert b"\n  " in resp.content
    assert doc["resourceType"] == ("Bundle" if bundle else "Patient")
    if bundle:
        assert len(doc["entry"]) == 17


def test_fault_unrequested_type_in_manifest(source: SourceSandbox) -> None:
    token = source_token(source)
    source.faults.unrequested_type()
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    # docs/practice-fusion.md: Location
    assert {e["type"] for e in manifest["output"]} == {"Patient", "Location"}


def test_fault_export_fails_with_operation_outcome(source: SourceSandbox) -> None:
    token = source_token(source)
    source.faults.export_fails()
    url = _kickoff(source, token).headers["content-location"]
    resp = httpx.get(url, headers=_auth(token))
    assert resp.status_code == 500 and resp.json()["issue"][0]["severity"] == "error"


def test_fault_expired_status_url(source: SourceSandbox) -> None:
    token = source_token(source)
    status_url, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    source.faults.expired_status()
    assert httpx.get(status_url, headers=_auth(token)).status_code == 404
    assert httpx.get(manifest["output"][0]["url"], headers=_auth(token)).status_code == 404


def test_fault_foreign_storage_records_leaked_token(source: SourceSandbox) -> None:
    token = source_token(source)
    source.faults.foreign_storage()
    _, manifest = export_and_wait(source, token, params={"_type": "Patient"})
    url = manifest["output"][0]["url"]
    assert url.startswith(source.foreign_url) and not url.startswith(source.server_url)
    assert len(httpx.get(url).content.splitlines()) == 17  # signed-URL style: no token needed
    assert not source.stats.authorization_sent(source.foreign_url)
    httpx.get(url, headers=_auth(token))
    assert source.stats.authorization_sent(source.foreign_url)


def test_fault_revoke_tokens_after_kickoff(source: SourceSandbox) -> None:
    token = source_token(source)
    source.faults.revoke_tokens_after_kickoff()
    url = _kickoff(source, token).headers["content-location"]
    assert httpx.get(url, headers=_auth(token)).status_code == 401
    assert httpx.get(url, headers=_auth(source_token(source))).status_code in (200, 202)


def test_fault_armed_through_control_api(source: SourceSandbox) -> None:
    token = source_token(source)
    httpx.post(
        source.server_url + "/_sandbox/faults", json={"name": "rate_limit", "where": "kickoff", "times": 2}
    )
    assert [_kickoff(source, token).status_code for _ in range(3)] == [429, 429, 202]


def test_fault_unknown_name_refused(source: SourceSandbox) -> None:
    with pytest.raises(ValueError):
        source.faults.arm("no_such_fault")
    assert httpx.post(source.server_url + "/_sandbox/faults", json={"name": "nope"}).status_code == 400


def test_export_ready_at_is_when_the_status_first_answers_complete(source: SourceSandbox) -> None:
    """scripts/bench_export's polling lag is counted from it: files written and busy_export over."""
    token = source_token(source)
    source.faults.busy_export(seconds=0.3, retry_after=None)
    before = time.time()
    status_url = _kickoff(source, token, _type="Patient").headers["content-location"]
    guid = status_url.rsplit("/", 1)[1]
    assert source.export_ready_at("no-such-export") is None
    while (poll := httpx.get(status_url, headers=_auth(token))).status_code == 202:
        time.sleep(0.05)
    answered = time.time()
    assert poll.status_code == 200
    ready = source.export_ready_at(guid)
    assert ready is not None and before + 0.3 <= ready <= answered
