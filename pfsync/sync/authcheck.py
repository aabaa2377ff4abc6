"""`pfsync auth test`: check each source and Medplum end to end, and say what to fix for each failure.

docs/practice-fusion.md: several behaviours are undocumented (which export levels answer, whether `_type`
and `_since` are honoured), so they are probed here instead of assumed. Every kick-off a probe
starts is cancelled at once (docs/bulk-data.md "Status polling": DELETE the status URL), so no job is
left running. The library returns a report; the CLI renders it and maps failures to exit codes.

The report records and the checks every probe shares are pfsync.sync.authcheck_report; the
probes are pfsync.sync.authcheck_source and pfsync.sync.authcheck_medplum.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from pfsync.core.errors import ExitCode
from pfsync.core.settings import Settings
from pfsync.net.http import Clock, SystemClock
from pfsync.sync.authcheck_medplum import check_medplum
from pfsync.sync.authcheck_report import AuthTestReport, Check, TargetReport
from pfsync.sync.authcheck_source import SourceProbe

__all__ = ["AuthTestReport", "Check", "TargetReport", "run_auth_test"]


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
        targets.append(SourceProbe(source, settings, client, clock).run())
    if include_medplum:
        if progress:
            progress("checking Medplum")
        targets.append(check_medplum(settings, client, clock))
    return AuthTestReport(tuple(targets))
