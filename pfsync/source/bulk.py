"""Bulk Data protocol client: the export request, kick-off, clean-up and their retries (docs/bulk-data.md).

Stateless functions over an injected `httpx.Client`, an `httpx.Auth` and a `Clock`: status polling
(pfsync.source.poll), the manifest (pfsync.source.manifest), the export directory
(pfsync.source.exportjob), downloads (pfsync.source.download) and orchestration
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
from pfsync.core.redact import redact
from pfsync.core.settings import ExportSettings, SourceSettings
from pfsync.net.http import (
    BULK_RULES,
    KICKOFF_RULES,
    Clock,
    RetryPolicy,
    RetryRule,
    classify,
    hinted_wait,
    outcome_text,
    request_with_retry,
)
from pfsync.net.http import is_temporary as http_is_temporary

log = logging.getLogger("pfsync.export")

# docs/bulk-data.md, recorded case 30: the reference server compares Accept as a plain string.
KICKOFF_ACCEPT = "application/fhir+json"
NDJSON_FORMAT = "application/fhir+ndjson"
Level = Literal["system", "patient", "group"]


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


def narrow_to_granted(
    request: ExportRequest, granted_types: Sequence[str] | None, unsupported: Sequence[str], strict: bool
) -> tuple[ExportRequest, str, str]:
    """`request` without the types the token does not cover, and what to say about them: those the
    server does not have (left out of the token request, docs/export-decisions.md "Resource types")
    apart from those it did not grant ("" when none). AuthError when strict and some were not
    granted, or when nothing is left. `granted_types` None: no check."""
    if granted_types is None or not request.types:
        return request, "", ""
    granted = set(granted_types)
    lacking = [t for t in request.types if t not in granted and t in unsupported]
    refused = [t for t in request.types if t not in granted and t not in unsupported]
    kept = tuple(t for t in request.types if t in granted)
    texts = (
        f"the server does not have {', '.join(lacking)} (left out of the token request)" if lacking else "",
        f"the token's scope does not grant {', '.join(refused)}" if refused else "",
    )
    if (refused and strict) or not kept:
        raise AuthError(
            "; ".join(t for t in texts if t) + ("" if kept else ": nothing left to export"),
            hint="ask the practice admin to authorise these types, or remove them from the resource types",
        )
    return replace(request, types=kept), *texts


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


def refusal(response: httpx.Response, what: str) -> ExportError | AuthError:
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


def send(
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
    deadline_at: float | None = None,
) -> str:
    """Start an export; returns the absolute status URL. A 429 is waited out (pfsync.net.http.KICKOFF_RULES)
    up to `deadline_at` (the export deadline; None: http.retry_max_wait per wait); a refusal raises
    ExportError (AuthError for 401/403) with the server's OperationOutcome text."""
    method, url, kwargs = build_kickoff(base_url, request)
    req = client.build_request(method, url, **kwargs)
    attempt = 0
    while True:
        response = send(client, req, auth, policy=policy, clock=clock, stop=stop, rules=KICKOFF_RULES)
        if classify(response, KICKOFF_RULES) != "wait-out":
            break
        attempt += 1
        _wait_out(response, url, attempt, policy=policy, clock=clock, stop=stop, deadline_at=deadline_at)
    if response.status_code != 202:
        if response.is_success:
            raise ExportError(
                f"export kick-off at {redact(url)} answered {response.status_code} instead of 202 Accepted",
                hint="the server may not support asynchronous Bulk Data export at this level",
            )
        if response.status_code == 404 and request.group_id is not None:
            raise unknown_group(request.group_id, base_url, outcome_text(response) or "404 Not Found")
        raise refusal(response, "export kick-off")
    location = response.headers.get("Content-Location")
    if not location:
        raise ExportError(f"export kick-off at {redact(url)} answered 202 without a Content-Location")
    return urljoin(str(response.request.url), str(location))


def _wait_out(
    response: httpx.Response,
    url: str,
    attempt: int,
    *,
    policy: RetryPolicy,
    clock: Clock,
    stop: threading.Event | None,
    deadline_at: float | None,
) -> None:
    """Wait before the `attempt`-th repeat of a kick-off the server put off ("wait-out"): its
    Retry-After in full (else backoff), as long as the deadline allows; HTTPError (temporary: a
    later run tries again) past the retry budget or the deadline."""
    hinted = hinted_wait(response, clock.now())
    delay = hinted if hinted is not None else policy.backoff(attempt)
    if deadline_at is None:
        delay = min(delay, policy.max_wait)
    text = outcome_text(response)
    reason = f"HTTP {response.status_code}" + (f": {text}" if text else "")
    late = deadline_at is not None and clock.now() + delay > deadline_at
    if attempt > policy.retries or late:
        why = "the export deadline (export.deadline)" if late else f"{policy.retries} retries"
        raise HTTPError(
            f"export kick-off at {redact(url)} was put off ({reason}, retry in {delay:.0f} s) past {why}",
            method=response.request.method, url=url, status=response.status_code, outcome=text,
            hint="the server asks for a later kick-off: run again later (nothing was started), or raise "
                 "PFSYNC_EXPORT_DEADLINE to wait that long",
        )  # fmt: skip
    log.warning("export kick-off answered %s; kicking off again in %.1f s", reason, delay,
                extra={"event": "http_retry"})  # fmt: skip
    response.close()
    wait(clock, delay, stop)


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
        response = send(client, req, auth, policy=policy, clock=clock, stop=None)
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


def delete_job(
    client: httpx.Client, auth: httpx.Auth | None, status_url: str, *, policy: RetryPolicy, clock: Clock
) -> bool:
    """DELETE the job (cancel, or clean up after download). True if the server accepted it;
    404/410 (already gone) is False, not an error."""
    req = client.build_request("DELETE", status_url, headers={"Accept": "application/json"})
    response = send(client, req, auth, policy=policy, clock=clock, stop=None)
    if response.status_code in (404, 410):
        return False
    if not response.is_success:
        raise refusal(response, "export delete")
    return True
