"""Bulk Data protocol client: kick-off, status polling and the server's manifest (docs/bulk-data.md).

Stateless functions over an injected `httpx.Client`, an `httpx.Auth` and a `Clock`: the
export directory (pfsync.source.exportjob), downloads (pfsync.source.download) and orchestration
(pfsync.source.export) sit on top. Every request decides per URL whether credentials go with it
(`Origins`): the token is only ever sent to the source's own origin or an explicit allowlist.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from pfsync.core.errors import AuthError, ConfigError, ExportError, HTTPError, InterruptedRunError
from pfsync.core.events import EventSink
from pfsync.core.redact import redact
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import (
    BULK_RULES,
    STATUS_POLL_RULES,
    Clock,
    RetryPolicy,
    RetryRule,
    classify,
    outcome_text,
    parse_retry_after,
    request_with_retry,
)
from pfsync.net.http import is_temporary as http_is_temporary

log = logging.getLogger("pfsync.export")

# docs/bulk-data.md, recorded case 30: the reference server compares Accept as a plain string.
KICKOFF_ACCEPT = "application/fhir+json"
NDJSON_FORMAT = "application/fhir+ndjson"
Level = Literal["system", "patient", "group"]
Kind = Literal["output", "error", "deleted"]


@dataclass(frozen=True)
class ExportRequest:
    """What to export. `types` empty = every type the server has; `since` is a FHIR instant."""

    level: Level = "patient"
    group_id: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    type_filters: tuple[str, ...] = ()
    output_format: str = NDJSON_FORMAT
    method: Literal["get", "post"] = "get"

    def __post_init__(self) -> None:
        if (self.level == "group") != (self.group_id is not None):
            raise ValueError("group_id is required for, and only for, level 'group'")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["types"], data["type_filters"] = list(self.types), list(self.type_filters)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRequest:
        return cls(**{**data, "types": tuple(data["types"]), "type_filters": tuple(data["type_filters"])})

    def fingerprint(self) -> str:
        """A short stable id of the request: callers name export directories with it."""
        return hashlib.sha256(orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def requests_for(
    source: SourceSettings,
    settings: ExportSettings,
    *,
    since: str | None = None,
    types: Sequence[str] | None = None,
) -> list[ExportRequest]:
    """One ExportRequest per group (or one for patient/system level) from the source's settings.

    docs/practice-fusion.md "Bulk export": PF documents Patient and Group level only, so "auto" is
    group when groups are configured, else patient.
    """
    level = source.export_level
    if level == "auto":
        level = "group" if source.groups else "patient"
    common: dict[str, Any] = {
        "types": tuple(types if types is not None else source.resource_types),
        "since": since,
        "type_filters": tuple(source.type_filter),
        "method": settings.kickoff_method,
    }
    if level == "system" and common["types"] and "Group" not in common["types"]:
        # A system export is all the server holds, Groups included (issue 20: without this a
        # type list that names no Group left out the server's 8 Groups).
        common["types"] += ("Group",)
    if level == "group":
        if not source.groups:
            raise ExportError(f"source {source.name!r}: export level 'group' needs at least one group id")
        return [ExportRequest(level="group", group_id=g, **common) for g in source.groups]
    return [ExportRequest(level=level, **common)]


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
    next_url = None
    for link in body.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            next_url = urljoin(page_url, link["url"])
    return Manifest(
        transaction_time=body["transactionTime"],
        request=str(body.get("request", "")),
        # Bulk Data IG: requiresAccessToken false means the URLs are usable without a token.
        requires_access_token=body.get("requiresAccessToken") is not False,
        files=tuple(files),
        next_url=next_url,
    )


def origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class Origins:
    """Which URLs may receive credentials: the source's origin plus `source.download_allowlist`.

    docs/bulk-data.md "Download": signed storage URLs must never receive the token (it leaks it and
    can break the signature). BearerAuth checks origins too; this is the first of two layers.
    """

    def __init__(self, base_url: str, extra: Iterable[str] = ()) -> None:
        self.allowed = frozenset(origin(u) for u in (base_url, *extra))

    def auth_for(self, url: str, auth: httpx.Auth | None) -> httpx.Auth | None:
        return auth if origin(url) in self.allowed else None


class JobExpired(ExportError):
    """The saved status URL answered 404/410: the server forgot the job; start a new one.
    `files_only`: the status URL answered, but a file of the manifest is gone (docs/bulk-data.md, recorded case 53)."""

    files_only: bool = False


def export_id(status_url: str) -> str:
    return urlsplit(status_url).path.rstrip("/").rsplit("/", 1)[-1]


def wait(clock: Clock, seconds: float, stop: threading.Event | None) -> None:
    """Sleep in short slices so Ctrl-C / SIGTERM (the `stop` event) cuts a long wait short."""
    deadline = clock.now() + seconds
    while True:
        if stop is not None and stop.is_set():
            raise InterruptedRunError("export interrupted; the job is saved and the next run resumes it")
        left = deadline - clock.now()
        if left <= 0:
            return
        clock.sleep(min(left, 0.5))


def is_temporary(response: httpx.Response) -> bool:
    """Worth retrying within the retry budget (pfsync.net.http.BULK_RULES)."""
    return http_is_temporary(response, BULK_RULES)


def _fail(response: httpx.Response, what: str) -> ExportError | AuthError:
    text = outcome_text(response) or f"HTTP {response.status_code}"
    url = redact(str(response.request.url))
    # The reason first: the URL (a kick-off URL can run to hundreds of characters) only after it.
    if response.status_code == 401:
        return AuthError(f"{what} refused ({response.status_code}): {text} (at {url})",
                         hint="the FHIR server refuses the access token its token endpoint issued (revoked, "
                              "expired or not authorised): check the app's registration with the EHR; "
                              "`pfsync auth test` shows each step")  # fmt: skip
    if response.status_code == 403:
        return AuthError(f"{what} refused ({response.status_code}): {text} (at {url})",
                         hint="the token does not allow this export: ask the practice admin to authorise "
                              "the app for bulk export of these resource types")  # fmt: skip
    return ExportError(f"{what} failed ({response.status_code}): {text} (at {url})")


@dataclass(frozen=True)
class _StopClock:
    """A Clock whose sleeps end early (InterruptedRunError) when `stop` is set."""

    clock: Clock
    stop: threading.Event | None

    def now(self) -> float:
        return self.clock.now()

    def sleep(self, seconds: float) -> None:
        wait(self.clock, seconds, self.stop)


def _send(
    client: httpx.Client,
    request: httpx.Request,
    auth: httpx.Auth | None,
    *,
    policy: RetryPolicy,
    clock: Clock,
    stop: threading.Event | None,
    rules: tuple[RetryRule, ...] = BULK_RULES,
    on_retry: Callable[[int, float, str], None] | None = None,
) -> httpx.Response:
    """`request` through the generic retry path (pfsync.net.http.request_with_retry), with the Bulk
    Data classifier `rules`. Returns the final response, which may be an error to interpret."""
    return request_with_retry(
        lambda: client.send(request, auth=auth),
        method=request.method,
        url=str(request.url),
        policy=policy,
        clock=_StopClock(clock, stop),
        on_retry=on_retry,
        retry_if=lambda response: http_is_temporary(response, rules),
    )


# Status polling schedule (docs/export-decisions.md "Polling"), used when the server's Retry-After
# does not ask for longer: 0.5 s growing to 1 s within the first second, 1 s until POLL_YOUNG
# seconds after the kick-off (a short job completes within a second of the server finishing), then
# (elapsed / POLL_YOUNG)**2 but never more than POLL_SHARE of the elapsed time. That is about 27
# polls in the first minute and 5 in the second, so two clients behind one address stay under the
# SMART reference server's 60 a minute per route, and a long job waits at most a fifth longer.
POLL_FIRST = 0.5
POLL_STEADY = 1.0
POLL_YOUNG = 15.0
POLL_SHARE = 0.2


def poll_wait(elapsed: float, hinted: float | None, cap: float) -> float:
    """Seconds until the next status poll, `elapsed` seconds after the kick-off; `hinted` is the
    server's Retry-After (a minimum), `cap` is export.poll_max_wait."""
    pause = min(POLL_STEADY, POLL_FIRST + max(elapsed, 0.0) / 2)
    if elapsed > POLL_YOUNG:
        pause = max(POLL_STEADY, min((elapsed / POLL_YOUNG) ** 2, elapsed * POLL_SHARE))
    if hinted is not None:
        pause = max(pause, hinted)
    return min(cap, pause)


def build_kickoff(base_url: str, request: ExportRequest) -> tuple[str, str, dict[str, Any]]:
    """(method, URL, httpx keyword arguments) of the kick-off request (docs/bulk-data.md "Kick-off")."""
    path = {"system": "/$export", "patient": "/Patient/$export"}.get(request.level)
    if path is None:
        path = f"/Group/{request.group_id}/$export"
    url = base_url.rstrip("/") + path
    headers = {"Accept": KICKOFF_ACCEPT, "Prefer": "respond-async"}
    params: list[tuple[str, str]] = [("_outputFormat", request.output_format)]
    if request.types:
        params.append(("_type", ",".join(request.types)))  # one value: some servers refuse repeats
    if request.since:
        params.append(("_since", request.since))
    params += [("_typeFilter", f) for f in request.type_filters]
    if request.method == "get":
        return "GET", url, {"headers": headers, "params": params}
    value_kind = {"_since": "valueInstant"}
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": k, value_kind.get(k, "valueString"): v} for k, v in params],
    }
    headers["Content-Type"] = "application/fhir+json"
    return "POST", url, {"headers": headers, "content": orjson.dumps(body)}


def kickoff(
    client: httpx.Client,
    auth: httpx.Auth | None,
    base_url: str,
    request: ExportRequest,
    *,
    policy: RetryPolicy,
    clock: Clock,
    stop: threading.Event | None = None,
) -> str:
    """Start an export; returns the absolute status URL. 429 waits and retries; a refusal raises
    ExportError (AuthError for 401/403) with the server's OperationOutcome text."""
    method, url, kwargs = build_kickoff(base_url, request)
    req = client.build_request(method, url, **kwargs)
    response = _send(client, req, auth, policy=policy, clock=clock, stop=stop)
    if response.status_code != 202:
        if response.is_success:
            raise ExportError(
                f"export kick-off at {redact(url)} answered {response.status_code} instead of 202 Accepted",
                hint="the server may not support asynchronous Bulk Data export at this level",
            )
        if response.status_code == 404 and request.group_id is not None:
            raise unknown_group(request.group_id, base_url, outcome_text(response) or "404 Not Found")
        raise _fail(response, "export kick-off")
    location = response.headers.get("Content-Location")
    if not location:
        raise ExportError(f"export kick-off at {redact(url)} answered 202 without a Content-Location")
    return urljoin(str(response.request.url), str(location))


def unknown_group(group_id: str, base_url: str, reason: str) -> ConfigError:
    """docs/export-decisions.md "Unknown group": a group id the source does not know is a
    configuration mistake (exit 3), whether the server says 404 or exports nothing."""
    return ConfigError(
        f"group {group_id!r} does not exist at {redact(base_url)} ({reason})",
        setting="source.groups",
        hint=f"check PFSYNC_GROUPS / --group: GET {redact(base_url.rstrip('/'))}/Group lists the groups",
    )


def group_exists(
    client: httpx.Client,
    auth: httpx.Auth | None,
    base_url: str,
    group_id: str,
    *,
    policy: RetryPolicy,
    clock: Clock,
) -> bool | None:
    """Whether the source's Group search (`GET Group`: every group, without members, docs/bulk-data.md, recorded case 23)
    lists `group_id`; None when it cannot tell (refused, not a Bundle, or paged past the first page).
    A search rather than a read: Practice Fusion grants no Group read scope (docs/practice-fusion.md)."""
    req = client.build_request(
        "GET", f"{base_url.rstrip('/')}/Group", headers={"Accept": "application/fhir+json"}
    )
    try:
        response = _send(client, req, auth, policy=policy, clock=clock, stop=None)
        body = orjson.loads(response.content) if response.status_code == 200 else None
    except (HTTPError, orjson.JSONDecodeError):
        return None
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return None
    ids = {(e.get("resource") or {}).get("id") for e in body.get("entry") or [] if isinstance(e, dict)}
    if group_id in ids:
        return True
    paged = any(isinstance(link, dict) and link.get("relation") == "next" for link in body.get("link") or [])
    return None if paged else False


@dataclass
class Poller:
    """Polls one status (or manifest page) URL until it completes (docs/bulk-data.md "Status polling")."""

    client: httpx.Client
    auth: httpx.Auth | None
    settings: ExportSettings
    policy: RetryPolicy
    clock: Clock
    events: EventSink
    stop: threading.Event | None = None

    def poll(self, url: str, *, deadline_at: float, started_at: float | None = None) -> Manifest:
        """The manifest page at `url`, polled on the `poll_wait` schedule counted from `started_at`
        (the kick-off; default: now). Raises JobExpired on 404/410, ExportError when the export
        failed or the deadline passed (the job stays saved), TemporaryError past retries."""
        eid = export_id(url)
        started = self.clock.now() if started_at is None else started_at
        polls = 0
        # Retry-After on a 429 may be minutes (the reference server blocks a route for 5 minutes).
        policy = replace(self.policy, max_wait=self.settings.poll_max_wait)

        def on_retry(attempt: int, delay: float, reason: str) -> None:
            self.events.emit(
                "status_error", exportId=eid, message=reason, attempt=attempt, retryIn=round(delay, 3)
            )
            log.info("export status answered %s; retrying in %.1fs", reason, delay)

        while True:
            req = self.client.build_request("GET", url, headers={"Accept": "application/json"})
            try:
                response = _send(self.client, req, self.auth, policy=policy, clock=self.clock, stop=self.stop,
                                 rules=STATUS_POLL_RULES, on_retry=on_retry)  # fmt: skip
            except HTTPError as exc:
                exc.hint = exc.hint or "the job is saved: run the same command again to resume it"
                raise
            polls += 1
            status = response.status_code
            if status == 200:
                try:
                    body = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    raise ExportError(f"the export manifest at {redact(url)} is not JSON") from None
                return parse_manifest(body, str(response.request.url))
            if status in (404, 410):
                raise JobExpired(
                    f"the export job at {redact(url)} is gone ({status}): it expired or was deleted"
                )
            still_running = classify(response, STATUS_POLL_RULES) == "keep-polling"
            if status != 202 and not still_running:
                self.events.emit("status_error", exportId=eid, status=status,
                                 message=outcome_text(response) or "")  # fmt: skip
                raise _fail(response, "bulk export")
            hinted = parse_retry_after(response.headers.get("Retry-After"), self.clock.now())
            pause = poll_wait(self.clock.now() - started, hinted, self.settings.poll_max_wait)
            if still_running:
                self.events.emit("status_error", exportId=eid, status=status, message=outcome_text(response) or "",
                                 polls=polls, retryIn=round(pause, 3))  # fmt: skip
            else:
                self.events.emit("status_progress", exportId=eid, progress=response.headers.get("X-Progress", ""),
                                 polls=polls, retryIn=round(pause, 3))  # fmt: skip
            if self.clock.now() + pause > deadline_at:
                raise ExportError(
                    f"the export at {redact(url)} did not complete before the deadline "
                    f"({self.settings.deadline:.0f}s, export.deadline)",
                    hint="the job is saved: run the same command again to keep waiting for it",
                )
            wait(self.clock, pause, self.stop)


def delete_job(
    client: httpx.Client, auth: httpx.Auth | None, status_url: str, *, policy: RetryPolicy, clock: Clock
) -> bool:
    """DELETE the job (cancel, or clean up after download). True if the server accepted it;
    404/410 (already gone) is False, not an error."""
    req = client.build_request("DELETE", status_url, headers={"Accept": "application/json"})
    response = _send(client, req, auth, policy=policy, clock=clock, stop=None)
    if response.status_code in (404, 410):
        return False
    if not response.is_success:
        raise _fail(response, "export delete")
    return True


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
