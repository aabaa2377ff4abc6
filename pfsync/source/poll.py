"""Status polling: the schedule and the Poller that waits for an export's manifest (docs/bulk-data.md
"Status polling", docs/export-decisions.md "Polling" and "Errors while polling")."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace

import httpx
import orjson

from pfsync.core.errors import ExportError, HTTPError
from pfsync.core.events import EventSink
from pfsync.core.redact import redact
from pfsync.core.settings import ExportSettings
from pfsync.net.http import STATUS_POLL_RULES, Clock, RetryPolicy, classify, outcome_text, parse_retry_after
from pfsync.source.bulk import JobExpired, export_id, refusal, send, wait
from pfsync.source.manifest import Manifest, parse_manifest

log = logging.getLogger("pfsync.export")

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


def next_due(due: float, now: float, started: float, hinted: float | None, cap: float) -> float:
    """When the poll after the one that was `due` is due, answered at `now`: `poll_wait` after `due`
    (its elapsed time counted from `started`, the kick-off), never before `now` (a late answer is
    followed by one poll at once, never by a burst that catches up), and never sooner than the
    server's Retry-After (`hinted`, counted from its answer) nor later than `cap` after the answer."""
    scheduled = max(due + poll_wait(due - started, None, cap), now)
    if hinted is not None:
        scheduled = max(scheduled, now + min(hinted, cap))
    return min(scheduled, now + cap)


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
        # When the poll being sent was due: the schedule counts from it, not from the answer
        # (docs/export-decisions.md "Polling").
        due = self.clock.now()
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
                response = send(self.client, req, self.auth, policy=policy, clock=self.clock, stop=self.stop,
                                 rules=STATUS_POLL_RULES, on_retry=on_retry)  # fmt: skip
            except HTTPError as exc:
                exc.hint = exc.hint or "the job is saved: run the same command again to resume it"
                raise
            polls += 1
            manifest = self._settled(response, url, eid)
            if manifest is not None:
                return manifest
            now = self.clock.now()
            hinted = parse_retry_after(response.headers.get("Retry-After"), now)
            due = next_due(due, now, started, hinted, self.settings.poll_max_wait)
            pause = due - now
            if response.status_code != 202:  # an answer that means "still running" (a 500 `transient`)
                self.events.emit("status_error", exportId=eid, status=response.status_code,
                                 message=outcome_text(response) or "", polls=polls, retryIn=round(pause, 3))  # fmt: skip
            else:
                self.events.emit("status_progress", exportId=eid, progress=response.headers.get("X-Progress", ""),
                                 polls=polls, retryIn=round(pause, 3))  # fmt: skip
            if due > deadline_at:
                raise ExportError(
                    f"the export at {redact(url)} did not complete before the deadline "
                    f"({self.settings.deadline:.0f}s, export.deadline)",
                    hint="the job is saved: run the same command again to keep waiting for it",
                )
            wait(self.clock, pause, self.stop)

    def _settled(self, response: httpx.Response, url: str, eid: str) -> Manifest | None:
        """The manifest when `response` completes the job, None while the job runs (a 202, or an
        answer STATUS_POLL_RULES reads as "keep polling"); raises when the job is gone or failed."""
        status = response.status_code
        if status == 200:
            try:
                body = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise ExportError(f"the export manifest at {redact(url)} is not JSON") from None
            return parse_manifest(body, str(response.request.url))
        if status in (404, 410):
            raise JobExpired(f"the export job at {redact(url)} is gone ({status}): it expired or was deleted")
        if status != 202 and classify(response, STATUS_POLL_RULES) != "keep-polling":
            self.events.emit(
                "status_error", exportId=eid, status=status, message=outcome_text(response) or ""
            )
            raise refusal(response, "bulk export")
        return None
