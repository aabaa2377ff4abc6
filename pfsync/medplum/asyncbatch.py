"""Async batch Bundles (`Prefer: respond-async`) for large backfills: submit, poll, fetch results.

docs/medplum.md "Size limits" and docs/medplum.md, recorded case 39: the POST answers 202 with `Content-Location` of an
AsyncJob status URL; polls answer 202 with the AsyncJob until 200 `status: completed`, whose
`output.parameter[results].valueReference` names a Binary holding the raw batch-response Bundle,
parsed exactly like a synchronous one. Async jobs are not exempt from the quota on 5.0.x, and
even polls can get 429 (docs/medplum.md "Measured on a real server"): polls wait out `msBeforeNext`.
"""

from __future__ import annotations

import httpx
import orjson

from pfsync.core.errors import HTTPError
from pfsync.core.netpolicy import origin, shown_url
from pfsync.medplum.batch import Entry
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, outcome_text, server_text, wait

Result = tuple[int | None, bytes, str | None, str | None]  # status, content, RateLimit, error text
TOO_LARGE_EVEN_ASYNC = "resource too large for one request, even as an async batch"


def send_alone_async(
    bundle: list[Entry], body_bytes: int, routed: set[tuple[str, str]], sync_limit: int
) -> bool:
    """Whether a Bundle of a synchronous load goes as an async batch job: a single resource over the
    synchronous limit, or one the server refused as too large by itself (in `routed`).
    docs/medplum.md "Size limits": a synchronous body may be at most 1 MiB (over it, 413 or 400 "File
    too large"), while `Prefer: respond-async` accepts up to maxBatchSize (50 MB by default)."""
    return len(bundle) == 1 and (body_bytes > sync_limit or bundle[0].key in routed)


class AsyncBatchRunner:
    """Runs one batch Bundle as an async job and returns its batch-response like a sync POST.

    Runs on the Bundle sender's worker threads: every request goes through the Medplum client's
    thread-safe paths (one attempt for the submission, whose outcome the sender decides per entry;
    polls and the results read through the one retry path, 429s waited out, unpaced)."""

    def __init__(
        self, client: MedplumClient, clock: Clock, *, max_bytes: int, poll_interval: float = 0.5,
        max_poll_interval: float = 10.0, deadline: float = 3600.0,
    ) -> None:  # fmt: skip
        self._client = client
        self._clock = clock
        self.max_bytes = max_bytes
        self._poll = poll_interval
        self._max_poll = max_poll_interval
        self._deadline = deadline

    def run(self, body: bytes) -> Result:
        try:
            response = self._client.send_once(
                "POST",
                "",
                content=body,
                headers={"Content-Type": "application/fhir+json", "Prefer": "respond-async"},
            )
        except httpx.TransportError as exc:
            return None, b"", None, f"{exc.__class__.__name__}: {server_text(str(exc))}"
        ratelimit = response.headers.get("ratelimit")
        if response.status_code != 202:
            # The server ran it synchronously (or refused it): the same shapes as a sync POST.
            text = outcome_text(response) if response.status_code >= 300 else None
            return response.status_code, response.content, ratelimit, text
        status_url = response.headers.get("content-location") or _diagnostics(response.content)
        if not status_url:
            return 502, b"", ratelimit, "async batch accepted without a status URL"
        status_url = self._client.url(status_url)
        if not self._on_medplum(status_url):
            # The job's status and results are read as our data: never from another origin.
            return (
                502,
                b"",
                ratelimit,
                f"async batch status URL {shown_url(status_url)} is not on Medplum's origin",
            )
        try:
            return self._poll_job(status_url, ratelimit)
        except HTTPError as exc:  # retries spent on network errors, 429s or 5xx: the sender decides
            return None, b"", ratelimit, exc.message

    def _on_medplum(self, url: str) -> bool:
        return origin(url) == origin(self._client.fhir_url)

    def _poll_job(self, status_url: str, ratelimit: str | None) -> Result:
        started = self._clock.now()
        interval = self._poll
        while True:
            wait(self._clock, interval, self._client.stop, "the async batch")
            interval = min(self._max_poll, interval * 1.5)
            response = self._client.send("GET", status_url, cost=None, headers={"Accept": "*/*"})
            ratelimit = response.headers.get("ratelimit") or ratelimit
            job = _json(response.content)
            state = job.get("status") if isinstance(job, dict) else None
            if response.status_code == 202 or state in ("accepted", "active"):
                if self._clock.now() - started > self._deadline:
                    return None, b"", ratelimit, "async batch did not complete in time"
                continue
            if response.status_code != 200 or state != "completed":
                return 500, b"", ratelimit, f"async batch job ended as {state or response.status_code}"
            binary = _results_reference(job)
            if binary is None:
                return 500, b"", ratelimit, "async batch job completed without results"
            binary = self._client.url(binary)
            if not self._on_medplum(binary):
                return (
                    502,
                    b"",
                    ratelimit,
                    f"async batch results {shown_url(binary)} are not on Medplum's origin",
                )
            result = self._client.send("GET", binary, cost=None, headers={"Accept": "*/*"})
            if result.status_code != 200:
                return None, b"", ratelimit, f"async batch results answered {result.status_code}"
            return 200, result.content, ratelimit, None


def _json(content: bytes) -> object:
    try:
        return orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None


def _diagnostics(content: bytes) -> str | None:
    doc = _json(content)
    if isinstance(doc, dict):
        for issue in doc.get("issue") or []:
            diag = issue.get("diagnostics") if isinstance(issue, dict) else None
            if isinstance(diag, str) and diag.startswith("http"):
                return diag
    return None


def _results_reference(job: object) -> str | None:
    if not isinstance(job, dict):
        return None
    output = job.get("output")
    params = output.get("parameter") if isinstance(output, dict) else None
    for param in params or []:
        if isinstance(param, dict) and param.get("name") == "results":
            ref = (param.get("valueReference") or {}).get("reference")
            if isinstance(ref, str):
                return ref
    return None
