"""The `auth test` engine against pytest-httpx fakes: the failure paths a sandbox cannot easily produce."""

from __future__ import annotations

import email.utils
import re
from dataclasses import replace
from typing import Any

import httpx
import pytest
from pytest_httpx import HTTPXMock
from test_auth_support import (
    BASE,
    METADATA_URL,
    SMART_URL,
    TOKEN_URL,
    FakeClock,
    jwt_source,
    smart_config,
    token_body,
)

from pfsync.core.errors import AuthError, ConfigError, ExitCode, TemporaryError
from pfsync.core.redact import Secret
from pfsync.core.settings import HttpSettings, MedplumSettings, Settings
from pfsync.sync.authcheck import AuthTestReport, Check, TargetReport, run_auth_test

KICK = f"{BASE}/Patient/$export"


def _settings(**source: Any) -> Settings:
    return Settings(sources=(jwt_source(**source),), http=HttpSettings(retries=1, retry_max_wait=0.1))


def _run(settings: Settings, clock: FakeClock | None = None) -> AuthTestReport:
    return run_auth_test(settings, httpx.Client(), include_medplum=False, clock=clock or FakeClock())


def _checks(report: AuthTestReport) -> dict[str, Check]:
    return {c.name: c for c in report.targets[0].checks}


def _date(clock: FakeClock, skew: float = 0.0) -> dict[str, str]:
    return {"Date": email.utils.formatdate(clock.now() + skew, usegmt=True)}


def _green(httpx_mock: HTTPXMock, clock: FakeClock, skew: float = 0.0) -> None:
    httpx_mock.add_response(
        url=METADATA_URL, json={"resourceType": "CapabilityStatement"}, headers=_date(clock, skew)
    )
    httpx_mock.add_response(url=SMART_URL, json=smart_config())
    httpx_mock.add_response(url=TOKEN_URL, method="POST", json=token_body(scope="system/*.rs"))
    httpx_mock.add_response(
        url=f"{BASE}/Group", json={"resourceType": "Bundle", "entry": []}, is_optional=True
    )


@pytest.mark.parametrize(
    ("exc", "name", "hint"),
    [(httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "tls", "PFSYNC_CA_BUNDLE"),
     (httpx.ConnectError("Name or service not known"), "reachable", "DNS")],
)  # fmt: skip
def test_authcheck_network_failures(httpx_mock: HTTPXMock, exc: Exception, name: str, hint: str) -> None:
    httpx_mock.add_exception(exc, url=METADATA_URL, is_reusable=True)
    report = _run(_settings())
    check = _checks(report)[name]
    assert check.status == "fail" and hint in (check.hint or "")
    assert report.exit_code == ExitCode.TEMPORARY
    error = report.error()
    assert isinstance(error, TemporaryError) and error.exit_code == ExitCode.TEMPORARY


def test_authcheck_clock_skew_is_reported(httpx_mock: HTTPXMock) -> None:
    clock = FakeClock()
    _green(httpx_mock, clock, skew=-400)
    httpx_mock.add_response(url=KICK, status_code=404, is_reusable=True)
    httpx_mock.add_response(url=f"{BASE}/$export", status_code=404)
    report = _run(_settings(), clock)
    check = _checks(report)["clock"]
    assert check.status == "warn" and "-400 s" in check.detail and "clock skew" in (check.hint or "")
    assert report.targets[0].facts["clockSkewSeconds"] == -400


def test_authcheck_token_refused_stops_before_probes(httpx_mock: HTTPXMock) -> None:
    clock = FakeClock()
    httpx_mock.add_response(url=METADATA_URL, headers=_date(clock))
    httpx_mock.add_response(url=SMART_URL, json=smart_config())
    httpx_mock.add_response(url=TOKEN_URL, method="POST", status_code=400,
                            json={"error": "invalid_grant", "error_description": "jwt expired"})  # fmt: skip
    report = _run(_settings(), clock)
    token = _checks(report)["token"]
    assert token.status == "fail" and "clock skew" in (token.hint or "")
    assert not any(c.name.startswith("export_") for c in report.targets[0].checks)
    assert isinstance(report.error(), AuthError) and report.exit_code == ExitCode.AUTH


def test_authcheck_needed_level_refused_and_params_probed_elsewhere(httpx_mock: HTTPXMock) -> None:
    clock = FakeClock()
    _green(httpx_mock, clock)
    status_url = f"{BASE}/Export/1"
    httpx_mock.add_response(url=KICK, status_code=400,
                            json={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "only Group"}]})  # fmt: skip
    httpx_mock.add_response(url=f"{BASE}/$export", status_code=202, headers={"Content-Location": status_url})
    httpx_mock.add_response(url=httpx.URL(f"{BASE}/$export", params={"_type": "Patient"}), status_code=400)
    httpx_mock.add_response(url=status_url, method="DELETE", status_code=202)
    since = re.compile(r".*/\$export\?_since=.*")  # the _since value comes from the clock
    httpx_mock.add_response(url=since, status_code=202, headers={"Content-Location": status_url})
    httpx_mock.add_response(url=status_url, method="DELETE", status_code=404)  # second cancel fails
    report = _run(_settings(), clock)
    checks = _checks(report)
    assert checks["export_patient"].status == "fail" and "only Group" in checks["export_patient"].detail
    assert checks["export_system"].status == "ok"
    assert checks["export_group"].status == "skip"  # no group configured or listed
    assert checks["param_type"].status == "warn" and checks["param_since"].status == "ok"
    facts = report.targets[0].facts
    assert facts["exportLevels"] == {"group": None, "patient": False, "system": True}
    assert [j["cancelled"] for j in facts["probeJobs"]] == [True, False]
    assert report.exit_code == ExitCode.CONFIG and isinstance(report.error(), ConfigError)


def test_authcheck_missing_credentials_is_config(httpx_mock: HTTPXMock) -> None:
    clock = FakeClock()
    httpx_mock.add_response(url=METADATA_URL, headers=_date(clock))
    report = _run(_settings(private_key=None), clock)
    assert _checks(report)["credentials"].status == "fail" and report.exit_code == ExitCode.CONFIG


def test_authcheck_no_source_configured() -> None:
    report = run_auth_test(Settings(sources=()), httpx.Client(), include_medplum=False)
    assert report.targets[0].checks[0].name == "configured" and report.exit_code == ExitCode.CONFIG


def test_authcheck_plain_http_remote_is_flagged(httpx_mock: HTTPXMock) -> None:
    base = "http://ehr.example.com/fhir"
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{base}/metadata", is_reusable=True)
    report = _run(_settings(base_url=base))
    transport = _checks(report)["transport"]
    assert transport.status == "warn" and "HTTP instead of HTTPS" in (transport.hint or "")


def test_authcheck_medplum_fhir_read_refused(httpx_mock: HTTPXMock) -> None:
    medplum = MedplumSettings(
        base_url="https://mp.example.com/", client_id="c", client_secret=Secret("mp-s3cret")
    )
    httpx_mock.add_response(
        url="https://mp.example.com/oauth2/token", method="POST", json=token_body("mp-tok")
    )
    httpx_mock.add_response(url="https://mp.example.com/fhir/R4/Patient?_summary=count", status_code=403,
                            json={"resourceType": "OperationOutcome", "issue": [{"details": {"text": "Forbidden"}}]})  # fmt: skip
    settings = replace(Settings(sources=()), medplum=medplum)
    report = run_auth_test(settings, httpx.Client(), clock=FakeClock())
    medplum_report = report.targets[-1]
    checks = {c.name: c for c in medplum_report.checks}
    assert checks["token"].status == "ok" and checks["fhir_read"].status == "fail"
    assert "access policy" in (checks["fhir_read"].hint or "")
    assert checks["rate_limit"].status == "skip"


def test_authcheck_report_json_is_redacted() -> None:
    check = Check("token", "fail", "Bearer abcdefghijklmnop refused", hint="x", code=ExitCode.AUTH)
    doc = AuthTestReport((TargetReport("source", "a", "https://x", (check,)),)).to_json()
    assert "abcdefghijklmnop" not in str(doc) and doc["exitCode"] == 4 and doc["ok"] is False
