"""Auth failures say what they are (issue 17): registration vs clock, jti, a FHIR-side 401 during
`auth test` is exit 4, a /metadata 404 is not "ok"."""

from __future__ import annotations

import email.utils

import httpx
import orjson
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

from pfsync.core.errors import AuthError, ConfigError, ExitCode
from pfsync.core.settings import HttpSettings, Settings
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.source.auth import token_failure_hint
from pfsync.sync.authcheck import AuthTestReport, Check, run_auth_test

# Texts the SMART reference bulk-data-server sends (docs/bulk-data.md, its simulated registration errors).
REGISTRATION_EXPIRED = "Registration token expired"
INVALID_JTI = "Invalid 'jti' value"
JWT_EXPIRED = "Unable to verify the token with any of the public keys found in the JWKS: jwt expired"


@pytest.mark.parametrize(
    ("description", "wanted", "not_wanted"),
    [
        (REGISTRATION_EXPIRED, "registration has expired", "clock"),
        (INVALID_JTI, "jti", "check the client id, the registered key"),
        (JWT_EXPIRED, "clock skew", "registration"),
    ],
)
def test_token_refusal_hints_tell_registration_jti_and_clock_apart(
    description: str, wanted: str, not_wanted: str
) -> None:
    hint = token_failure_hint(400, "invalid_grant", description, "private_key_jwt")
    assert wanted in hint and not_wanted not in hint


def _settings() -> Settings:
    return Settings(sources=(jwt_source(),), http=HttpSettings(retries=1, retry_max_wait=0.1))


def _run() -> AuthTestReport:
    return run_auth_test(_settings(), httpx.Client(), include_medplum=False, clock=FakeClock())


def _checks(report: AuthTestReport) -> dict[str, Check]:
    return {c.name: c for c in report.targets[0].checks}


def _date() -> dict[str, str]:
    return {"Date": email.utils.formatdate(FakeClock().now(), usegmt=True)}


def test_auth_test_fhir_side_401_on_every_probe_is_an_authorisation_failure(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=METADATA_URL, json={"resourceType": "CapabilityStatement"}, headers=_date())
    httpx_mock.add_response(url=SMART_URL, json=smart_config())
    httpx_mock.add_response(
        url=TOKEN_URL, method="POST", json=token_body(scope="system/*.rs"), is_reusable=True
    )
    httpx_mock.add_response(url=f"{BASE}/Group", status_code=401, text="Invalid token", is_optional=True,
                            is_reusable=True)  # fmt: skip
    # bulk-data-server with err=request_invalid_token: every FHIR request gets 401 text/html "Invalid token".
    for url in (f"{BASE}/Patient/$export", f"{BASE}/$export"):
        httpx_mock.add_response(url=url, status_code=401, text="Invalid token",
                                headers={"Content-Type": "text/html"}, is_reusable=True)  # fmt: skip
    report = _run()
    check = _checks(report)["export_patient"]
    assert check.status == "fail" and check.code == ExitCode.AUTH
    assert "refuses the access token" in (check.hint or "") and "--level" not in (check.hint or "")
    assert report.exit_code == ExitCode.AUTH
    error = report.error()
    assert isinstance(error, AuthError) and "refuses the access token" in (error.hint or "")


def test_auth_test_metadata_404_is_a_wrong_base_url(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=METADATA_URL, status_code=404, headers=_date())
    httpx_mock.add_response(url=SMART_URL, json=smart_config(), is_optional=True)
    httpx_mock.add_response(
        url=TOKEN_URL, method="POST", json=token_body(scope="system/*.rs"), is_optional=True
    )
    httpx_mock.add_response(url=f"{BASE}/Group", json={"resourceType": "Bundle"}, is_optional=True)
    httpx_mock.add_response(
        url=httpx.URL(f"{BASE}/Patient/$export"), status_code=404, is_optional=True, is_reusable=True
    )
    httpx_mock.add_response(url=f"{BASE}/$export", status_code=404, is_optional=True, is_reusable=True)
    report = _run()
    reachable = _checks(report)["reachable"]
    assert reachable.status == "fail" and "404" in reachable.detail
    assert "PF_FHIR_BASE_URL" in (reachable.hint or "")
    assert report.exit_code == ExitCode.CONFIG and isinstance(report.error(), ConfigError)


def test_auth_test_clock_shows_no_minus_zero(httpx_mock: HTTPXMock) -> None:
    from pfsync.sync.authcheck_report import clock_check as _clock_check

    clock = FakeClock(t=1_700_000_000.4)  # the Date header has whole seconds: 0.4 s behind
    response = httpx.Response(200, headers={"Date": email.utils.formatdate(clock.now(), usegmt=True)})
    assert _clock_check(response, clock, {}).detail == "0 s from the server's Date header"


@pytest.mark.integration
def test_auth_test_cli_fhir_side_401_is_exit_4_against_the_sandbox(source: SourceSandbox) -> None:
    from typer.testing import CliRunner

    from pfsync.cli import app

    source.faults.server_error("kickoff", times=None, status=401)  # the token works, the FHIR API refuses it
    env = {"PF_FHIR_BASE_URL": source.base_url(), "PF_CLIENT_ID": "pfsync-sandbox",
           "PF_CLIENT_SECRET": "sandbox-secret", "PFSYNC_LOG_FORMAT": "human"}  # fmt: skip
    result = CliRunner().invoke(app, ["auth", "test", "--no-medplum", "--json"], env=env)
    assert result.exit_code == 4, result.output
    (target,) = orjson.loads(result.stdout)["targets"]
    checks = {c["name"]: c for c in target["checks"]}
    assert checks["token"]["status"] == "ok"
    assert (
        checks["export_patient"]["status"] == "fail"
        and "refuses the access token" in checks["export_patient"]["hint"]
    )
    assert "hint: the FHIR server refuses the access token" in result.stderr


@pytest.mark.parametrize(
    ("status", "code"), [(404, ExitCode.CONFIG), (503, ExitCode.TEMPORARY), (401, ExitCode.AUTH)]
)
def test_auth_test_medplum_fhir_read_failure_codes(
    httpx_mock: HTTPXMock, status: int, code: ExitCode
) -> None:
    from dataclasses import replace

    from pfsync.core.redact import Secret
    from pfsync.core.settings import MedplumSettings

    medplum = MedplumSettings(
        base_url="https://mp.example.com/", client_id="c", client_secret=Secret("mp-s3cret")
    )
    httpx_mock.add_response(  # reusable: a 401 renews the token once
        url="https://mp.example.com/oauth2/token", method="POST", json=token_body("mp-tok"), is_reusable=True
    )
    httpx_mock.add_response(url="https://mp.example.com/fhir/R4/Patient?_summary=count", status_code=status,
                            is_reusable=True)  # fmt: skip
    settings = replace(
        Settings(sources=()), medplum=medplum, http=HttpSettings(retries=0, retry_max_wait=0.1)
    )
    report = run_auth_test(settings, httpx.Client(), clock=FakeClock())
    (check,) = [c for c in report.targets[-1].checks if c.name == "fhir_read"]
    assert check.status == "fail" and check.code == code
