"""`pfsync auth test`: check each source and Medplum end to end, and say what to fix for each failure.

docs/practice-fusion.md: several behaviours are undocumented (which export levels answer, whether `_type`
and `_since` are honoured), so they are probed here instead of assumed. Every kick-off a probe
starts is cancelled at once (docs/bulk-data.md "Status polling": DELETE the status URL), so no job is
left running. The library returns a report; the CLI renders it and maps failures to exit codes.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson

from pfsync.core.errors import AuthError, ConfigError, ExitCode, HTTPError, PfsyncError, TemporaryError
from pfsync.core.redact import redact
from pfsync.core.settings import HttpSettings, Settings, SourceSettings, is_loopback
from pfsync.medplum.auth import MedplumAuthenticator, OriginBasicAuth
from pfsync.net.http import Clock, RetryPolicy, SystemClock, outcome_text, request_with_retry
from pfsync.source.auth import NO_AUTH, BearerAuth, SourceAuthenticator

Status = Literal["ok", "warn", "fail", "skip"]
CLOCK_SKEW_WARN = 60.0  # seconds; assertions live 240 s and PF allows exp at most 300 s ahead
LEVELS = ("group", "patient", "system")


@dataclass(frozen=True)
class Check:
    """One line of the report. `code` is the exit code this failure maps to."""

    name: str
    status: Status
    detail: str
    hint: str | None = None
    code: ExitCode | None = None


@dataclass(frozen=True)
class TargetReport:
    """The checks of one source or of Medplum, plus the facts found (for --json)."""

    kind: Literal["source", "medplum"]
    name: str
    url: str
    checks: tuple[Check, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


@dataclass(frozen=True)
class AuthTestReport:
    targets: tuple[TargetReport, ...]

    @property
    def failures(self) -> list[tuple[TargetReport, Check]]:
        return [(t, c) for t in self.targets for c in t.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> ExitCode:
        """Config problems first (fix those before anything else), then auth, then the rest."""
        codes = [c.code or ExitCode.AUTH for _, c in self.failures]
        for preferred in (ExitCode.CONFIG, ExitCode.AUTH):
            if preferred in codes:
                return preferred
        return codes[0] if codes else ExitCode.OK

    def error(self) -> PfsyncError | None:
        """The error the CLI raises after rendering, or None when everything needed works."""
        if self.ok:
            return None
        names = ", ".join(f"{t.name}: {c.name}" for t, c in self.failures)
        message = f"auth test: {len(self.failures)} check(s) failed ({names})"
        # The failing checks' own hints: the error line must stand alone (a JSON log has no "above").
        hints = list(dict.fromkeys(c.hint for _, c in self.failures if c.hint))
        hint = "; ".join(hints) if hints else "see the checks above"
        if self.exit_code == ExitCode.CONFIG:
            return ConfigError(message, hint=hint)
        if self.exit_code == ExitCode.AUTH:
            return AuthError(message, hint=hint)
        err = TemporaryError(message, hint=hint)
        err.exit_code = self.exit_code
        return err

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "exitCode": int(self.exit_code),
            "targets": [
                {"kind": t.kind, "name": t.name, "url": t.url, "ok": t.ok, "facts": t.facts,
                 "checks": [{"name": c.name, "status": c.status, "detail": redact(c.detail),
                             "hint": redact(c.hint) if c.hint else None} for c in t.checks]}
                for t in self.targets
            ],
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# helpers


def _transport_hint(exc: BaseException) -> tuple[str, str]:
    """(check name, hint) for a network failure: TLS problems get their own line."""
    text = f"{exc.__class__.__name__} {exc}"
    if "SSL" in text or "CERTIFICATE" in text.upper() or "TLS" in text:
        return "tls", ("TLS verification failed: is the certificate valid for this host? For a private "
                       "CA set PFSYNC_CA_BUNDLE (verification cannot be turned off)")  # fmt: skip
    return "reachable", "cannot connect: check the URL, DNS, firewall or proxy, and that the server is up"


def _transport_check(url: str) -> Check:
    if urlsplit(url).scheme == "https":
        return Check("transport", "ok", "https")
    if is_loopback(url):
        return Check("transport", "ok", "http on loopback (sandbox / local only)")
    return Check("transport", "warn", "plain HTTP to a remote host (allowed by PFSYNC_ALLOW_INSECURE_HTTP)",
                 hint="HTTP instead of HTTPS: credentials and PHI travel in clear text; use https")  # fmt: skip


def _clock_check(response: httpx.Response, clock: Clock, facts: dict[str, Any]) -> Check:
    date = response.headers.get("Date")
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        server = None
    if server is None:
        return Check("clock", "skip", "the server sent no Date header")
    skew = server - clock.now()
    facts["clockSkewSeconds"] = round(skew, 1)
    if abs(skew) > CLOCK_SKEW_WARN:
        return Check("clock", "warn", f"server clock is {skew:+.0f} s from ours",
                     hint="clock skew: sync this machine's clock (NTP); assertions are refused when "
                          "their exp is more than 300 s ahead of the server's clock")  # fmt: skip
    # The Date header has whole seconds: below one second there is no sign to show ("-0 s").
    shown = "0 s" if abs(skew) < 1 else f"{skew:+.0f} s"
    return Check("clock", "ok", f"{shown} from the server's Date header")


def _probe_settings(http: HttpSettings) -> HttpSettings:
    # A diagnostic should answer in seconds, not sit through the full retry budget.
    return replace(http, retries=min(http.retries, 2), retry_max_wait=min(http.retry_max_wait, 10.0))


# ---------------------------------------------------------------------------------------------
# sources


class _SourceProbe:
    def __init__(
        self, source: SourceSettings, settings: Settings, client: httpx.Client, clock: Clock
    ) -> None:
        self.source = source
        self.base = source.base_url.rstrip("/")
        self.settings = settings
        self.http = _probe_settings(settings.http)
        self.policy = RetryPolicy.from_settings(self.http)
        self.client = client
        self.clock = clock
        self.checks: list[Check] = []
        self.facts: dict[str, Any] = {"tokenObtained": False}

    def report(self) -> TargetReport:
        return TargetReport("source", self.source.name, self.base, tuple(self.checks), self.facts)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.checks.append(Check(*args, **kwargs))

    def run(self) -> TargetReport:
        self.checks.append(_transport_check(self.base))
        if not self._reachable():
            return self.report()
        authn = self._authenticator()
        if authn is None or not self._discovery(authn) or not self._token(authn):
            return self.report()
        self._scopes(authn)
        self._export_probes(BearerAuth(authn, origins=[self.base, *self.source.download_allowlist]))
        return self.report()

    def _reachable(self) -> bool:
        url = f"{self.base}/metadata"
        try:
            response = request_with_retry(
                lambda: self.client.get(url, headers={"Accept": "application/fhir+json"}, auth=NO_AUTH),
                method="GET", url=url, policy=self.policy, clock=self.clock,
            )  # fmt: skip
        except HTTPError as exc:
            name, hint = _transport_hint(exc)
            self.add(name, "fail", exc.message, hint=hint, code=ExitCode.TEMPORARY)
            return False
        status = response.status_code
        if status in (404, 410) or (400 <= status < 500 and status not in (401, 403, 406, 429)):
            # A FHIR base URL serves its CapabilityStatement at /metadata: a 404 means a wrong base URL.
            self.add("reachable", "fail", f"GET /metadata answered {status}", code=ExitCode.CONFIG,
                     hint="this is not a FHIR base URL: check PF_FHIR_BASE_URL (for Practice Fusion, "
                          "one URL per practice, ending in the practice id)")  # fmt: skip
        elif status >= 300:
            self.add("reachable", "warn", f"GET /metadata answered {status}")
        else:
            self.add("reachable", "ok", f"GET /metadata answered {status}")
        tls = "certificate verified" if response.url.scheme == "https" else "not used (http)"
        self.add("tls", "ok" if response.url.scheme == "https" else "skip", tls)
        self.checks.append(_clock_check(response, self.clock, self.facts))
        return True

    def _authenticator(self) -> SourceAuthenticator | None:
        try:
            authn = SourceAuthenticator(
                self.source,
                self.client,
                http=self.http,
                clock=self.clock,
                negotiate=not self.settings.export.strict_scopes,
            )
        except ConfigError as exc:
            self.add("credentials", "fail", exc.message, hint=exc.hint, code=ExitCode.CONFIG)
            return None
        self.facts["authMethod"] = authn.method
        detail: str = authn.method
        if authn.signing_key is not None:
            detail += f" ({authn.signing_key.alg}, kid {authn.signing_key.kid})"
        self.add("auth_method", "ok", detail)
        return authn

    def _discovery(self, authn: SourceAuthenticator) -> bool:
        try:
            found = authn.discovery
        except ConfigError as exc:
            self.add("discovery", "fail", exc.message, hint=exc.hint, code=ExitCode.CONFIG)
            return False
        except HTTPError as exc:
            self.add("discovery", "fail", exc.message, hint=_transport_hint(exc)[1], code=ExitCode.TEMPORARY)
            return False
        self.facts["tokenEndpoint"] = found.token_endpoint
        self.facts["discovery"] = found.found_in
        where = {"setting": "from PFSYNC_TOKEN_URL", "smart-configuration": "from .well-known/smart-configuration",
                 "metadata": "from the CapabilityStatement (no smart-configuration)"}[found.found_in]  # fmt: skip
        self.add("discovery", "ok", where)
        self.add("token_endpoint", "ok", found.token_endpoint)
        if found.auth_methods and authn.method not in found.auth_methods:
            self.add("auth_method_advertised", "warn",
                     f"{authn.method} is not among {', '.join(found.auth_methods)}",
                     hint="the server may refuse this client authentication method")  # fmt: skip
        return True

    def _token(self, authn: SourceAuthenticator) -> bool:
        try:
            authn.token()
        except AuthError as exc:
            self.add("token", "fail", exc.message, hint=exc.hint, code=ExitCode.AUTH)
            return False
        except ConfigError as exc:
            self.add("token", "fail", exc.message, hint=exc.hint, code=ExitCode.CONFIG)
            return False
        except HTTPError as exc:
            self.add("token", "fail", exc.message, hint=_transport_hint(exc)[1], code=ExitCode.TEMPORARY)
            return False
        token = authn.last_token
        assert token is not None
        self.facts.update(tokenObtained=True, expiresIn=int(token.lifetime))
        self.add("token", "ok", "obtained")
        self.add("expiry", "ok", f"expires in {int(token.lifetime)} s")
        return True

    def _scopes(self, authn: SourceAuthenticator) -> None:
        requested = list(authn.requested_scopes)
        granted, missing = authn.granted_types(self.source.resource_types)
        self.facts.update(scopeVersion=authn.scope_version, scopesRequested=requested,
                          scopesGranted=sorted(authn.granted_scopes), missingTypes=missing)  # fmt: skip
        self.add("scopes_requested", "ok", " ".join(requested))
        self.add("scopes_granted", "ok", " ".join(sorted(authn.granted_scopes)) or "(none)")
        if authn.unsupported_types:
            self.facts["unsupportedTypes"] = list(authn.unsupported_types)
            self.add("types_unsupported", "warn",
                     f"the server does not have {', '.join(authn.unsupported_types)}: not requested",
                     hint="drop them from PF_RESOURCE_TYPES to silence this; PFSYNC_STRICT_SCOPES=true "
                     "refuses the whole token instead")  # fmt: skip
        missing = [t for t in missing if t not in authn.unsupported_types]
        if not missing:
            self.add("scopes", "ok", f"all {len(granted)} types granted")
            return
        hint = ("scope not authorised by the practice admin: ask them to authorise the app for "
                f"{', '.join(missing)}, or drop those types from PF_RESOURCE_TYPES")  # fmt: skip
        fatal = not granted or self.settings.export.strict_scopes
        self.add("scopes", "fail" if fatal else "warn", f"not granted: {', '.join(missing)}", hint=hint,
                 code=ExitCode.AUTH)  # fmt: skip

    # -- export probes: kick off, note the answer, cancel at once
    def _kickoff(self, url: str, params: dict[str, str], auth: BearerAuth) -> tuple[int | None, str]:
        headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
        try:
            response = request_with_retry(
                lambda: self.client.get(url, params=params, headers=headers, auth=auth),
                method="GET", url=url, policy=self.policy, clock=self.clock,
            )  # fmt: skip
        except HTTPError as exc:
            return exc.status, exc.message
        if response.status_code != 202:
            return response.status_code, outcome_text(response) or f"HTTP {response.status_code}"
        location = response.headers.get("Content-Location")
        if not location:
            return 202, "accepted, but no Content-Location to cancel the job with"
        try:
            cancel = self.client.delete(location, auth=auth)
            cancelled = cancel.status_code in (200, 202, 204)
        except httpx.HTTPError:
            cancelled = False
        self.facts.setdefault("probeJobs", []).append({"url": location, "cancelled": cancelled})
        return (
            202,
            "202 accepted (probe job cancelled)"
            if cancelled
            else f"202 accepted; cancelling {location} failed",
        )

    def _group_id(self, auth: BearerAuth) -> str | None:
        if self.source.groups:
            return self.source.groups[0]
        try:
            response = self.client.get(
                f"{self.base}/Group", headers={"Accept": "application/fhir+json"}, auth=auth
            )
            body = orjson.loads(response.content) if response.status_code == 200 else {}
        except (httpx.HTTPError, orjson.JSONDecodeError):
            return None
        for entry in body.get("entry") or [] if isinstance(body, dict) else []:
            resource = (entry or {}).get("resource") or {}
            if resource.get("resourceType") == "Group" and resource.get("id"):
                return str(resource["id"])
        return None

    def _export_probes(self, auth: BearerAuth) -> None:
        level = self.source.export_level
        needed = level if level != "auto" else ("group" if self.source.groups else "patient")
        group = self._group_id(auth)
        self.facts["probeGroup"] = group
        urls = {"patient": f"{self.base}/Patient/$export", "system": f"{self.base}/$export"}
        if group:
            urls["group"] = f"{self.base}/Group/{group}/$export"
        answers: dict[str, bool | None] = {}
        for name in LEVELS:
            if name not in urls:  # only "group": needed == "group" implies configured groups
                answers[name] = None
                self.add("export_group", "skip", "no group id: none configured and GET /Group listed none",
                         hint="to export by Group, set PFSYNC_GROUPS to a Group id created by the practice")  # fmt: skip
                continue
            status, text = self._kickoff(urls[name], {}, auth)
            works = status == 202
            answers[name] = works
            if works:
                self.add(f"export_{name}", "ok", text)
            elif name == needed and status in (401, 403):
                # The token endpoint issued a token the FHIR API refuses: authorisation, not the level.
                self.add(f"export_{name}", "fail", f"HTTP {status}: {text}", code=ExitCode.AUTH,
                         hint="the FHIR server refuses the access token the token endpoint issued (revoked, "
                              "expired or not authorised for bulk export): check the app's registration "
                              "and authorisation with the EHR / practice admin")  # fmt: skip
            elif name == needed:
                self.add(f"export_{name}", "fail", f"HTTP {status}: {text}", code=ExitCode.CONFIG,
                         hint="the server refuses the configured export level: pick another with --level "
                              "(PFSYNC_EXPORT_LEVEL) or PFSYNC_GROUPS")  # fmt: skip
            else:  # not the level pfsync will use: informational
                self.add(f"export_{name}", "skip", f"not available (HTTP {status}: {text})")
        self.facts["exportLevels"] = answers
        working = needed if answers.get(needed) else next((n for n in LEVELS if answers.get(n)), None)
        if working is None:
            return
        granted = [t for t in self.source.resource_types if t not in self.facts.get("missingTypes", [])]
        sample = "Patient" if "Patient" in granted else (granted[0] if granted else "Patient")
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.now() - 86400))
        for param, value, hint in (
            ("_type", sample, "the server refuses _type: every type is exported and filtered locally"),
            (
                "_since",
                since,
                "the server refuses _since: every run is a full export (slower, still correct)",
            ),
        ):
            status, text = self._kickoff(urls[working], {param: value}, auth)
            self.facts["accepts" + param.title().replace("_", "")] = status == 202
            if status == 202:
                self.add(f"param{param}", "ok", f"accepted at {working} level")
            else:
                self.add(f"param{param}", "warn", f"HTTP {status}: {text}", hint=hint)


# ---------------------------------------------------------------------------------------------
# Medplum


def _medplum(settings: Settings, client: httpx.Client, clock: Clock) -> TargetReport:
    medplum = settings.medplum
    http = _probe_settings(settings.http)
    checks: list[Check] = [_transport_check(medplum.base_url)]
    facts: dict[str, Any] = {"authMethod": medplum.auth, "tokenObtained": False}

    def done() -> TargetReport:
        return TargetReport("medplum", "medplum", medplum.base_url, tuple(checks), facts)

    auth: httpx.Auth
    try:
        if medplum.auth == "basic":
            if not medplum.client_id or not medplum.client_secret:
                raise ConfigError("Medplum Basic auth needs MEDPLUM_CLIENT_ID and MEDPLUM_CLIENT_SECRET",
                                  setting="medplum.client_id")  # fmt: skip
            auth = OriginBasicAuth(
                medplum.client_id, medplum.client_secret.reveal(), origins=[medplum.base_url]
            )
            authn = None
        else:
            authn = MedplumAuthenticator(medplum, client, http=http, clock=clock)
            auth = BearerAuth(authn, origins=[medplum.base_url])
    except ConfigError as exc:
        checks.append(Check("credentials", "fail", exc.message, hint=exc.hint, code=ExitCode.CONFIG))
        return done()
    checks.append(
        Check("auth_method", "ok", "client_credentials token" if authn else "HTTP Basic on each call")
    )
    if authn is not None:
        checks.append(Check("token_endpoint", "ok", authn.token_endpoint))
        try:
            authn.token()
        except AuthError as exc:
            checks.append(Check("token", "fail", exc.message, hint=exc.hint, code=ExitCode.AUTH))
            return done()
        except HTTPError as exc:
            name, hint = _transport_hint(exc)
            checks.append(Check(name, "fail", exc.message, hint=hint, code=ExitCode.TEMPORARY))
            return done()
        assert authn.last_token is not None
        lifetime = int(authn.last_token.lifetime)
        facts.update(tokenObtained=True, expiresIn=lifetime)
        checks.append(Check("token", "ok", "obtained"))
        checks.append(Check("expiry", "ok", f"expires in {lifetime} s"))
    url = medplum.fhir_url + "Patient"
    try:
        # docs/medplum.md "Quotas and 429": a count-only search is cheap and shows the RateLimit header.
        response = client.get(url, params={"_summary": "count"}, headers={"Accept": "application/fhir+json"},
                              auth=auth)  # fmt: skip
    except httpx.HTTPError as exc:
        name, hint = _transport_hint(exc)
        checks.append(
            Check(name, "fail", f"GET {url}: {exc.__class__.__name__}", hint=hint, code=ExitCode.TEMPORARY)
        )
        return done()
    checks.append(_clock_check(response, clock, facts))
    if response.status_code == 200:
        total = (orjson.loads(response.content) or {}).get("total") if response.content else None
        checks.append(Check("fhir_read", "ok", f"GET fhir/R4/Patient?_summary=count: 200 (total {total})"))
    else:
        hint = {401: "credentials refused on the FHIR API: check MEDPLUM_CLIENT_ID / MEDPLUM_CLIENT_SECRET "
                     "and MEDPLUM_BASE_URL",
                403: "the ClientApplication's access policy does not allow reading Patient"}.get(
            response.status_code, "check MEDPLUM_BASE_URL (the server root, FHIR lives under fhir/R4/)")  # fmt: skip
        status = response.status_code
        # 404 and other 4xx: the URL is wrong (exit 3); 429 and 5xx: try later (exit 75).
        code = (ExitCode.AUTH if status in (401, 403) else
                ExitCode.TEMPORARY if status == 429 or status >= 500 else ExitCode.CONFIG)  # fmt: skip
        checks.append(Check("fhir_read", "fail", f"HTTP {response.status_code}: {outcome_text(response) or ''}",
                            hint=hint, code=code))  # fmt: skip
    quota = response.headers.get("RateLimit")
    facts["rateLimit"] = quota
    checks.append(Check("rate_limit", "ok" if quota else "skip", quota or "no RateLimit header"))
    return done()


# ---------------------------------------------------------------------------------------------


def run_auth_test(
    settings: Settings,
    client: httpx.Client,
    *,
    source_name: str | None = None,
    include_medplum: bool = True,
    clock: Clock | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuthTestReport:
    """Check the chosen source (or every enabled one) and Medplum; never raises for a failed check."""
    clock = clock or SystemClock()
    targets: list[TargetReport] = []
    if source_name is not None:
        sources = [settings.source(source_name)]
    else:
        sources = [s for s in settings.sources if s.enabled]
    if not sources:
        check = Check("configured", "fail", "no source is configured", code=ExitCode.CONFIG,
                      hint="set PF_FHIR_BASE_URL or add a [[sources]] table to pfsync.toml")  # fmt: skip
        targets.append(TargetReport("source", "(none)", "", (check,)))
    for source in sources:
        if progress:
            progress(f"checking source {source.name}")
        targets.append(_SourceProbe(source, settings, client, clock).run())
    if include_medplum:
        if progress:
            progress("checking Medplum")
        targets.append(_medplum(settings, client, clock))
    return AuthTestReport(tuple(targets))
