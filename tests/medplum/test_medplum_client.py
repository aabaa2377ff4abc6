"""MedplumClient: one renewal on 401, 429 waits (Retry-After both forms, msBeforeNext), pacing, paging."""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from doubles import FakeClock

from pfsync.core.errors import ExitCode, HTTPError, ProtocolError
from pfsync.core.redact import Secret
from pfsync.core.settings import HttpSettings, MedplumSettings
from pfsync.medplum.auth import medplum_auth
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import RetryPolicy

BASE = "https://medplum.example/"
FHIR = BASE + "fhir/R4/"
SETTINGS = MedplumSettings(base_url=BASE, client_id="mp-client", client_secret=Secret("mp-client-secret"))


Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, clock: FakeClock, **kw: Any) -> MedplumClient:
    http = httpx.Client(transport=httpx.MockTransport(handler), base_url=FHIR)
    return MedplumClient(
        http, clock=clock, policy=kw.pop("policy", RetryPolicy(retries=2, max_wait=60.0)), **kw
    )


def searchset(ids: list[str], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids]}  # fmt: skip


def throttled(ms: int) -> bytes:
    # docs/medplum.md "Quotas and 429": no Retry-After, the wait is in the diagnostics JSON.
    diag = orjson.dumps({"_remainingPoints": 0, "_msBeforeNext": ms, "_consumedPoints": 50060}).decode()
    return orjson.dumps({"resourceType": "OperationOutcome", "id": "too-many-requests",
                         "issue": [{"severity": "error", "code": "throttled", "diagnostics": diag}]})  # fmt: skip


def token_body(value: str) -> dict[str, Any]:
    return {"token_type": "Bearer", "expires_in": 3600, "access_token": value}


def test_client_renews_the_token_once_on_401_and_retries_the_request() -> None:
    tokens = iter(["mp-token-1", "mp-token-2"])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth2/token":
            return httpx.Response(200, json=token_body(next(tokens)))
        seen.append(request.headers["Authorization"])
        if request.headers["Authorization"] == "Bearer mp-token-1":  # revoked on the server
            return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})
        return httpx.Response(200, json=searchset(["a"]))

    clock = FakeClock()
    http = httpx.Client(transport=httpx.MockTransport(handler), base_url=FHIR)
    mp = MedplumClient(http, auth=medplum_auth(SETTINGS, http, clock=clock), clock=clock)
    assert mp.search_all("Patient", {"_count": "10"}) == [{"resourceType": "Patient", "id": "a"}]
    assert seen == ["Bearer mp-token-1", "Bearer mp-token-2"]


def test_client_renews_the_token_only_once_when_401_persists() -> None:
    token_requests: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth2/token":
            token_requests.append(1)
            return httpx.Response(200, json=token_body(f"mp-token-{len(token_requests)}"))
        return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})

    clock = FakeClock()
    http = httpx.Client(transport=httpx.MockTransport(handler), base_url=FHIR)
    mp = MedplumClient(http, auth=medplum_auth(SETTINGS, http, clock=clock), clock=clock)
    with pytest.raises(HTTPError) as info:
        mp.get_json("Patient", "a Medplum search")
    assert info.value.exit_code == ExitCode.AUTH and len(token_requests) == 2
    assert "mp-token" not in info.value.message


def test_connect_uses_the_process_shared_token() -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    first = MedplumClient.connect(SETTINGS, http, settings=HttpSettings())
    second = MedplumClient.connect(SETTINGS, http, settings=HttpSettings())
    assert getattr(first.auth, "provider") is getattr(second.auth, "provider")  # noqa: B009


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("7", 7.0), (email.utils.formatdate(1_700_000_000.0 + 30, usegmt=True), 30.0), ("100000", 60.0)],
    ids=["delta-seconds", "http-date", "capped"],
)
def test_client_waits_out_a_429_by_retry_after_in_both_forms(retry_after: str, expected: float) -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": retry_after}),
                    httpx.Response(200, json=searchset(["a"]))])  # fmt: skip
    clock = FakeClock()
    mp = client(lambda request: next(answers), clock)
    assert mp.get_json("Patient", "a search")["entry"]
    assert clock.slept == [pytest.approx(expected, abs=1.0)]
    assert mp.stats.throttled == 1 and mp.stats.requests == 2


def test_client_waits_ms_before_next_and_429s_do_not_use_up_retries() -> None:
    answers = iter([httpx.Response(429, content=throttled(1500)) for _ in range(5)]
                   + [httpx.Response(200, json=searchset(["a"]))])  # fmt: skip
    clock = FakeClock()
    mp = client(lambda request: next(answers), clock, policy=RetryPolicy(retries=1, max_wait=60.0))
    assert mp.get_json("Patient", "a search")["entry"]
    assert clock.slept == [1.5] * 5


def test_client_gives_up_on_429_past_its_patience_as_temporary() -> None:
    clock = FakeClock()
    mp = client(lambda request: httpx.Response(429, content=throttled(60_000)), clock,
                policy=RetryPolicy(retries=1, max_wait=60.0), throttle_patience=120.0)  # fmt: skip
    with pytest.raises(HTTPError, match="429") as info:
        mp.get_json("Patient", "a search")
    assert info.value.exit_code == ExitCode.TEMPORARY and info.value.temporary
    assert clock.slept == [60.0, 60.0, 60.0]  # two within the patience, then one retry of the budget


def test_client_paces_a_search_while_the_enforced_quota_is_spent() -> None:
    # A 429 proves the quota is enforced; the next answer leaves 10 points, less than a search (20).
    ratelimit = '"requests";r=59000;t=60, "fhirInteractions";r=10;t=30'
    answers = iter([httpx.Response(429, content=throttled(100)),
                    httpx.Response(200, json=searchset(["a"]), headers={"RateLimit": ratelimit}),
                    httpx.Response(200, json=searchset(["b"]))])  # fmt: skip
    clock = FakeClock()
    mp = client(lambda request: next(answers), clock)
    mp.get_json("Patient", "a search")
    assert clock.slept == [0.1]
    mp.get_json("Patient", "a search")
    assert clock.slept[-1] >= 30  # waited for the window instead of meeting another 429
    assert mp.stats.throttled == 1


def test_client_pages_next_links_onto_the_configured_base() -> None:
    # Medplum writes `next` with its public base URL: followed on the configured one.
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if "_offset" in str(request.url):
            return httpx.Response(200, json=searchset(["c"]))
        return httpx.Response(
            200, json=searchset(["a", "b"], "https://public.example/fhir/R4/Patient?_offset=2")
        )

    mp = client(handler, FakeClock())
    assert [r["id"] for r in mp.search_all("Patient", {"_count": "2"})] == ["a", "b", "c"]
    assert seen == [f"{FHIR}Patient?_count=2", f"{FHIR}Patient?_offset=2"]


def test_client_refuses_a_next_link_off_the_configured_origin() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=searchset(["a"], "https://evil.example/steal?page=2"))

    mp = client(handler, FakeClock())
    with pytest.raises(ProtocolError, match=r"not on https://medplum\.example") as info:
        mp.search_all("Patient", {"_count": "1"})
    assert seen == [f"{FHIR}Patient?_count=1"] and "page=2" not in info.value.message


def test_client_retries_network_errors_and_5xx_within_the_budget() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503) if len(calls) == 2 else httpx.Response(200, json=searchset([]))

    mp = client(handler, FakeClock())
    assert mp.get_json("Patient", "a search")["entry"] == []
    assert len(calls) == 3


def test_client_send_once_never_retries() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503)

    mp = client(handler, FakeClock())
    assert mp.send_once("POST", "", content=b"{}").status_code == 503 and calls == [1]


@pytest.mark.parametrize("body", [b"<html>a proxy's page</html>", b"[]"])
def test_client_refuses_a_search_answer_that_is_not_a_json_object(body: bytes) -> None:
    # Taken as "no match" it would create duplicates: exit 5, the next run tries again.
    mp = client(lambda request: httpx.Response(200, content=body), FakeClock())
    with pytest.raises(ProtocolError, match="not a JSON object"):
        mp.search_all("Patient", {"identifier": "urn:x|1"})


def test_retrier_without_patience_counts_every_429_even_one_asking_for_no_wait() -> None:
    from pfsync.net.http import Retrier

    retrier = Retrier("GET", FHIR + "Patient", RetryPolicy(retries=2, max_wait=60.0), FakeClock())
    answer = httpx.Response(429, headers={"Retry-After": "0"}, request=httpx.Request("GET", FHIR + "Patient"))
    assert [retrier.next_wait(answer) for _ in range(3)] == [0.0, 0.0, None]  # a budget, never a loop


def test_server_key_is_what_an_httpx_base_url_gave_so_existing_id_maps_stay_valid() -> None:
    fhir_url = "https://Medplum.Example.com:443/fhir/R4/"
    with httpx.Client(base_url=fhir_url) as before, MedplumClient(httpx.Client(), fhir_url=fhir_url) as mp:
        assert mp.server_key == str(before.base_url) == "https://medplum.example.com/fhir/R4/"


def test_connect_refuses_an_httpx_client_that_carries_its_own_auth_and_closes_it() -> None:
    http = httpx.Client(auth=("someone", "secret"))
    with pytest.raises(ValueError, match="must carry no auth"):
        MedplumClient.connect(SETTINGS, http)
    assert http.is_closed
