"""`pfsync auth test` for Medplum: credentials, token, one cheap FHIR read, the RateLimit header."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from pfsync.core.errors import AuthError, ConfigError, ExitCode, HTTPError, ProtocolError
from pfsync.core.settings import MedplumSettings, Settings
from pfsync.medplum.auth import MedplumAuthenticator, OriginBasicAuth
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, outcome_text
from pfsync.net.tokens import BearerAuth
from pfsync.sync.authcheck_report import (
    Check,
    TargetReport,
    clock_check,
    probe_settings,
    transport_check,
    transport_hint,
)


def check_medplum(settings: Settings, client: httpx.Client, clock: Clock) -> TargetReport:
    """Every check of Medplum, in order; a failed step ends the list."""
    medplum = settings.medplum
    checks: list[Check] = [transport_check(medplum.base_url)]
    facts: dict[str, Any] = {"authMethod": medplum.auth, "tokenObtained": False}
    auth = _auth(settings, client, clock, checks, facts)
    if auth is not None:
        _read(medplum, client, auth, clock, checks, facts)
    return TargetReport("medplum", "medplum", medplum.base_url, tuple(checks), facts)


def _auth(
    settings: Settings, client: httpx.Client, clock: Clock, checks: list[Check], facts: dict[str, Any]
) -> httpx.Auth | None:
    """The auth FHIR calls will use (a token proven by one request), or None after a failed check."""
    medplum = settings.medplum
    try:
        if medplum.auth == "basic":
            if not medplum.client_id or not medplum.client_secret:
                raise ConfigError("Medplum Basic auth needs MEDPLUM_CLIENT_ID and MEDPLUM_CLIENT_SECRET",
                                  setting="medplum.client_id")  # fmt: skip
            basic = OriginBasicAuth(
                medplum.client_id, medplum.client_secret.reveal(), origins=[medplum.base_url]
            )
            checks.append(Check("auth_method", "ok", "HTTP Basic on each call"))
            return basic
        authn = MedplumAuthenticator(medplum, client, http=probe_settings(settings.http), clock=clock)
    except ConfigError as exc:
        checks.append(Check("credentials", "fail", exc.message, hint=exc.hint, code=ExitCode.CONFIG))
        return None
    checks.append(Check("auth_method", "ok", "client_credentials token"))
    checks.append(Check("token_endpoint", "ok", authn.token_endpoint))
    try:
        authn.token()
    except AuthError as exc:
        checks.append(Check("token", "fail", exc.message, hint=exc.hint, code=ExitCode.AUTH))
        return None
    except HTTPError as exc:
        name, hint = transport_hint(exc)
        checks.append(Check(name, "fail", exc.message, hint=hint, code=ExitCode.TEMPORARY))
        return None
    assert authn.last_token is not None  # token() just set it
    lifetime = int(authn.last_token.lifetime)
    facts.update(tokenObtained=True, expiresIn=lifetime)
    checks.append(Check("token", "ok", "obtained"))
    checks.append(Check("expiry", "ok", f"expires in {lifetime} s"))
    return BearerAuth(authn, origins=[medplum.base_url])


def _read(
    medplum: MedplumSettings, client: httpx.Client, auth: httpx.Auth, clock: Clock, checks: list[Check],
    facts: dict[str, Any],
) -> None:  # fmt: skip
    """One count-only Patient search: proves the FHIR API answers these credentials."""
    url = medplum.fhir_url + "Patient"
    try:
        # docs/medplum.md "Quotas and 429": a count-only search is cheap and shows the RateLimit header.
        response = MedplumClient(client, fhir_url=medplum.fhir_url, auth=auth, clock=clock).send_once(
            "GET", url, params={"_summary": "count"}, headers={"Accept": "application/fhir+json"}
        )  # one attempt: a probe reports a 429 or 5xx as it is
    except ProtocolError as exc:  # a redirect loop, an undecodable body, an unsafe URL
        checks.append(Check("fhir_read", "fail", exc.message, hint=exc.hint, code=ExitCode.EXPORT_FAILED))
        return
    except httpx.HTTPError as exc:
        name, hint = transport_hint(exc)
        checks.append(
            Check(name, "fail", f"GET {url}: {exc.__class__.__name__}", hint=hint, code=ExitCode.TEMPORARY)
        )
        return
    checks.append(clock_check(response, clock, facts))
    status = response.status_code
    if status == 200:
        total = (orjson.loads(response.content) or {}).get("total") if response.content else None
        checks.append(Check("fhir_read", "ok", f"GET fhir/R4/Patient?_summary=count: 200 (total {total})"))
    else:
        hint = {401: "credentials refused on the FHIR API: check MEDPLUM_CLIENT_ID / MEDPLUM_CLIENT_SECRET "
                     "and MEDPLUM_BASE_URL",
                403: "the ClientApplication's access policy does not allow reading Patient"}.get(
            status, "check MEDPLUM_BASE_URL (the server root, FHIR lives under fhir/R4/)")  # fmt: skip
        # 404 and other 4xx: the URL is wrong (exit 3); 429 and 5xx: try later (exit 75).
        code = (ExitCode.AUTH if status in (401, 403) else
                ExitCode.TEMPORARY if status == 429 or status >= 500 else ExitCode.CONFIG)  # fmt: skip
        checks.append(Check("fhir_read", "fail", f"HTTP {status}: {outcome_text(response) or ''}",
                            hint=hint, code=code))  # fmt: skip
    quota = response.headers.get("RateLimit")
    facts["rateLimit"] = quota
    checks.append(Check("rate_limit", "ok" if quota else "skip", quota or "no RateLimit header"))
