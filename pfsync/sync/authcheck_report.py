"""What `pfsync auth test` reports: one `Check` per line, grouped per source and Medplum, and the
checks every probe shares (transport, clock skew from the Date header, quick retry settings).
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from pfsync.core.errors import AuthError, ConfigError, ExitCode, PfsyncError, TemporaryError
from pfsync.core.redact import redact
from pfsync.core.settings import HttpSettings, is_loopback
from pfsync.net.http import Clock

Status = Literal["ok", "warn", "fail", "skip"]
CLOCK_SKEW_WARN = 60.0  # seconds; assertions live 240 s and PF allows exp at most 300 s ahead


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


def transport_hint(exc: BaseException) -> tuple[str, str]:
    """(check name, hint) for a network failure: TLS problems get their own line."""
    text = f"{exc.__class__.__name__} {exc}"
    if "SSL" in text or "CERTIFICATE" in text.upper() or "TLS" in text:
        return "tls", ("TLS verification failed: is the certificate valid for this host? For a private "
                       "CA set PFSYNC_CA_BUNDLE (verification cannot be turned off)")  # fmt: skip
    return "reachable", "cannot connect: check the URL, DNS, firewall or proxy, and that the server is up"


def transport_check(url: str) -> Check:
    if urlsplit(url).scheme == "https":
        return Check("transport", "ok", "https")
    if is_loopback(url):
        return Check("transport", "ok", "http on loopback (sandbox / local only)")
    return Check("transport", "warn", "plain HTTP to a remote host (allowed by PFSYNC_ALLOW_INSECURE_HTTP)",
                 hint="HTTP instead of HTTPS: credentials and PHI travel in clear text; use https")  # fmt: skip


def clock_check(response: httpx.Response, clock: Clock, facts: dict[str, Any]) -> Check:
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


def probe_settings(http: HttpSettings) -> HttpSettings:
    # A diagnostic should answer in seconds, not sit through the full retry budget.
    return replace(http, retries=min(http.retries, 2), retry_max_wait=min(http.retry_max_wait, 10.0))
