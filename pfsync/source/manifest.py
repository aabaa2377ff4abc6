"""The export's completion manifest as the server sends it, and the issues of its error files
(docs/bulk-data.md "Manifest" and "Download")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin

from pfsync.core.errors import ExportError
from pfsync.core.ndjson import Record, iter_file
from pfsync.core.redact import redact
from pfsync.net.http import next_link

Kind = Literal["output", "error", "deleted"]


@dataclass(frozen=True)
class ManifestFile:
    kind: Kind
    type: str
    url: str
    count: int | None = None


@dataclass(frozen=True)
class Manifest:
    """One page of a completion manifest. `next_url`: the `link` next page (partial manifests)."""

    transaction_time: str
    request: str
    requires_access_token: bool
    files: tuple[ManifestFile, ...]
    next_url: str | None = None


def parse_manifest(body: Any, page_url: str) -> Manifest:
    """Validate a manifest body; relative URLs are resolved against the page's URL."""
    if not isinstance(body, dict) or not isinstance(body.get("transactionTime"), str):
        raise ExportError(f"the export manifest at {redact(page_url)} has no transactionTime")
    files: list[ManifestFile] = []
    kinds: tuple[Kind, ...] = ("output", "error", "deleted")
    for kind in kinds:
        entries = body.get(kind) or []
        if not isinstance(entries, list):
            raise ExportError(f"the export manifest's {kind} is not a list")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise ExportError(f"the export manifest has a {kind} entry without a url: {entry!r:.200}")
            count = entry.get("count")
            rtype = entry.get("type") or ("OperationOutcome" if kind == "error" else "Bundle")
            url = urljoin(page_url, entry["url"])
            files.append(ManifestFile(kind, str(rtype), url, count if isinstance(count, int) else None))
    # The next page is asked for with the source's token: it must stay on this page's origin (the
    # one Bundle-paging rule, pfsync.net.http.next_link: ProtocolError, exit 5, otherwise).
    next_url = next_link(body, page_url, "the export manifest")
    return Manifest(
        transaction_time=body["transactionTime"],
        request=str(body.get("request", "")),
        # Bulk Data IG: requiresAccessToken false means the URLs are usable without a token.
        requires_access_token=body.get("requiresAccessToken") is not False,
        files=tuple(files),
        next_url=next_url,
    )


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue from an `error` file."""

    severity: str
    code: str
    text: str

    @property
    def fatal(self) -> bool:
        # docs/bulk-data.md "Download": fatal/error fail the export; warning/information are reported.
        return self.severity in ("fatal", "error")


def issues_of(outcome: Any) -> list[Issue]:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return [Issue("error", "invalid", f"not an OperationOutcome: {str(outcome)[:200]}")]
    found = []
    for issue in outcome.get("issue") or []:
        if isinstance(issue, dict):
            text = (issue.get("details") or {}).get("text") or issue.get("diagnostics") or ""
            found.append(
                Issue(str(issue.get("severity", "error")), str(issue.get("code", "")), redact(str(text)))
            )
    return found


def issues_in_file(path: Path) -> list[Issue]:
    """The issues of an error file already on disk (a resumed export reads them again)."""
    found: list[Issue] = []
    for item in iter_file(path):
        if isinstance(item, Record):
            found += issues_of(item.resource)
    return found
