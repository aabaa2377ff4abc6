"""The one error tree of pfsync, and the stable exit codes the CLI maps it to.

    PfsyncError                      1  unexpected / generic
    ├── UsageError                   2  a bad argument or input path given on the command line
    ├── ConfigError                  3  missing, invalid or conflicting settings
    ├── AuthError                    4  credentials refused, token or scope problems
    ├── ExportError                  5  the source's bulk export failed (OperationOutcome text kept)
    │   └── ProtocolError                a server's answer was refused: unsafe redirect or URL,
    │                                    malformed, or over a size or time limit
    ├── PartialLoadError             6  the run finished but some resources were quarantined
    ├── StateError                   7  checkpoint / id map unreadable, corrupt or not writable
    ├── LockedError                  8  another run holds the lock or lease
    ├── UnhealthyError               9  `pfsync status`: a source is not healthy
    │                               10  retired (was "not implemented yet"): never reused
    ├── VerifyMismatchError         11  `pfsync verify`: target does not match the source
    ├── TemporaryError              75  network / 429 / 5xx still failing after retries (EX_TEMPFAIL)
    │   └── HTTPError                   carries method, URL, status and OperationOutcome text
    └── InterruptedRunError        130  SIGINT / SIGTERM: progress saved, the next run resumes

Rules (as in cumulus-etl's errors.py): codes are documented in the README and never reused once
retired; the library raises, it never prints or exits; the CLI maps errors to codes in one place.
Messages never contain secrets (pfsync.core.redact scrubs them again on the way out, as a second line).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG = 3
    AUTH = 4
    EXPORT_FAILED = 5
    PARTIAL = 6
    STATE = 7
    LOCKED = 8
    UNHEALTHY = 9
    # 10 was "not implemented yet" until every command had landed: retired, never reused.
    VERIFY_MISMATCH = 11
    TEMPORARY = 75
    INTERRUPTED = 130


class PfsyncError(Exception):
    """Base of every error pfsync raises on purpose. `hint` tells the user what to do next."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(PfsyncError):
    exit_code = ExitCode.USAGE


class ConfigError(PfsyncError):
    """A setting is missing, invalid or conflicts with another. `setting` names it."""

    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, *, setting: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.setting = setting


class AuthError(PfsyncError):
    exit_code = ExitCode.AUTH


class ExportError(PfsyncError):
    exit_code = ExitCode.EXPORT_FAILED


class ProtocolError(ExportError):
    """A server answered in a way pfsync refuses to act on: a redirect of a request carrying a body
    or credentials, a URL outside pfsync.core.netpolicy's rules, a malformed answer, an answer over a
    size or time limit. Retrying soon would meet the same answer."""


class PartialLoadError(PfsyncError):
    exit_code = ExitCode.PARTIAL


class StateError(PfsyncError):
    exit_code = ExitCode.STATE


class LockedError(PfsyncError):
    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, *, holder: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.holder = holder


class UnhealthyError(PfsyncError):
    exit_code = ExitCode.UNHEALTHY


class VerifyMismatchError(PfsyncError):
    exit_code = ExitCode.VERIFY_MISMATCH


class TemporaryError(PfsyncError):
    """Worth retrying later (cron's next run): the network or the server failed past our retries."""

    exit_code = ExitCode.TEMPORARY


class HTTPError(TemporaryError):
    """An HTTP exchange failed. Temporary unless `status` says the request itself was wrong.

    The exit code follows the status: 401/403 are auth failures, other 4xx are not worth a
    retry later (exit 1 unless a subclass or caller re-raises as something more precise).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        status: int | None = None,
        outcome: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.method = method
        self.url = url
        self.status = status
        self.outcome = outcome
        if status in (401, 403):
            self.exit_code = ExitCode.AUTH
        elif status is not None and 400 <= status < 500 and not self.temporary:
            self.exit_code = ExitCode.UNEXPECTED

    @property
    def temporary(self) -> bool:
        """No answer at all, or a status the one classifier calls temporary (pfsync.net.http.TEMPORARY_RULES
        is built from TEMPORARY_STATUS)."""
        return self.status is None or self.status in TEMPORARY_STATUS


# The answers that mean "try again later" on any request: the generic row of the one classifier
# (pfsync.net.http.TEMPORARY_RULES). Defined here so an error can say whether it is temporary.
TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class InterruptedRunError(PfsyncError):
    exit_code = ExitCode.INTERRUPTED


def exit_code_for(exc: BaseException) -> int:
    """The single mapping from an exception to a process exit code."""
    if isinstance(exc, PfsyncError):
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.UNEXPECTED)
