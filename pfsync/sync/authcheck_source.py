"""`pfsync auth test` for one source: reachable, credentials, discovery, token, scopes, export levels.

docs/practice-fusion.md: several behaviours are undocumented (which export levels answer, whether `_type`
and `_since` are honoured), so they are probed here instead of assumed. Every kick-off a probe
starts is cancelled at once (docs/bulk-data.md "Status polling": DELETE the status URL), so no job is
left running.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from pfsync.core.errors import AuthError, ConfigError, ExitCode, HTTPError
from pfsync.core.settings import Settings, SourceSettings
from pfsync.net.http import Clock, RetryPolicy, outcome_text, request_with_retry
from pfsync.net.tokens import NO_AUTH, BearerAuth
from pfsync.source.auth import SourceAuthenticator
from pfsync.sync.authcheck_report import (
    Check,
    TargetReport,
    clock_check,
    probe_settings,
    transport_check,
    transport_hint,
)

LEVELS = ("group", "patient", "system")


class SourceProbe:
    """The checks of one source, in order; each step stops the chain when the next cannot work."""

    def __init__(
        self, source: SourceSettings, settings: Settings, client: httpx.Client, clock: Clock
    ) -> None:
        self.source = source
        self.base = source.base_url.rstrip("/")
        self.settings = settings
        self.http = probe_settings(settings.http)
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
        self.checks.append(transport_check(self.base))
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
            name, hint = transport_hint(exc)
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
        self.checks.append(clock_check(response, self.clock, self.facts))
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
            self.add("discovery", "fail", exc.message, hint=transport_hint(exc)[1], code=ExitCode.TEMPORARY)
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
            self.add("token", "fail", exc.message, hint=transport_hint(exc)[1], code=ExitCode.TEMPORARY)
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
