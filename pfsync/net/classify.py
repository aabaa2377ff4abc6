"""The one retry classifier: tables of RetryRules (which statuses, OperationOutcome codes or texts are
temporary, for requests in general, Bulk Data polling and downloads, and Medplum batch entries) and
`decide`, the first matching rule's verdict.

May import: pfsync.core, pfsync.net.responses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx
import orjson

from pfsync.core.errors import TEMPORARY_STATUS
from pfsync.net.responses import outcome_text

# What an error answer means for the caller: "final" (interpret it), "retry" (within the retry
# budget, http.retries), "keep-polling" (an export still running: poll again on the poll schedule,
# until the export deadline rather than for a number of tries), "wait-out" (the server says "not
# now": wait what its Retry-After asks in full, not capped at http.retry_max_wait, as long as the
# export deadline allows; within the retry budget).
Verdict = Literal["final", "retry", "keep-polling", "wait-out"]


@dataclass(frozen=True)
class RetryRule:
    """One row of a classifier table: the statuses it covers and, optionally, the OperationOutcome
    issue code it needs (`code`), text its outcome must contain (`text`), or that the body is not
    FHIR at all (`not_fhir`: a proxy's page)."""

    statuses: frozenset[int]
    verdict: Verdict
    code: str | None = None
    not_fhir: bool = False
    text: str | None = None


_SERVER_ERRORS = frozenset(range(500, 600))
# docs/bulk-data.md "Status polling" and "Download": an error OperationOutcome means the export failed,
# except 408, 429, gateway errors, a 5xx whose issue code is `transient`, and a 5xx that is not FHIR.
BULK_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({408, 429, 502, 503, 504}), "retry"),
    RetryRule(_SERVER_ERRORS, "retry", code="transient"),
    RetryRule(_SERVER_ERRORS, "retry", not_fhir=True),
)
# docs/bulk-data.md "Download": a file download retries 408, 429 and every 5xx (a file's bytes are
# not a job's outcome: any server error there is worth another try).
DOWNLOAD_RULES: tuple[RetryRule, ...] = (RetryRule(_SERVER_ERRORS, "retry"), *BULK_RULES)
# While polling a status URL, a 500 `transient` OperationOutcome says the job is still running (the
# SMART reference server answers it on every poll until the job completes: docs/bulk-data.md
# "Status polling"), so it is polled again until the export deadline, not retried a few times. A
# 429 there is the same job, polled later: its Retry-After is a minimum wait (the reference server
# blocks the route for 5 minutes and then names an absolute time that may already have passed).
STATUS_POLL_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({500}), "keep-polling", code="transient"),
    RetryRule(frozenset({429}), "keep-polling"),
    *BULK_RULES,
)
# A 429 to an export kick-off asks for a later kick-off, however much later (the SMART reference
# server blocks the route for 5 minutes, docs/bulk-data.md "Retries and Retry-After"): waited out
# up to the export deadline (pfsync.source.bulk.kickoff) instead of failing after a few capped waits.
KICKOFF_RULES: tuple[RetryRule, ...] = (RetryRule(frozenset({429}), "wait-out"), *BULK_RULES)


def outcome_codes(response: httpx.Response) -> set[str] | None:
    """The issue codes of an OperationOutcome body; None when the body is not one."""
    try:
        body = orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    return {str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, dict)}


def classify(response: httpx.Response, rules: tuple[RetryRule, ...]) -> Verdict:
    """The verdict of the first rule that matches `response` ("final" when none does)."""
    return decide(response.status_code, rules, lambda: (outcome_codes(response), outcome_text(response)))


def decide(
    status: int, rules: tuple[RetryRule, ...], outcome: Callable[[], tuple[set[str] | None, str | None]]
) -> Verdict:
    """The verdict of the first rule that matches `status` and, where a rule asks, the answer's
    OperationOutcome: `outcome()` gives its issue codes (None: the body is not one) and its text,
    read only when a rule needs them. The one classifier: `classify` applies it to an HTTP answer,
    pfsync.medplum.batch to one entry of a batch-response."""
    codes: set[str] | None = None
    text: str | None = None
    parsed = False
    for rule in rules:
        if status not in rule.statuses:
            continue
        if rule.code is not None or rule.not_fhir or rule.text is not None:
            if not parsed:
                (codes, text), parsed = outcome(), True
            if rule.not_fhir and codes is not None:
                continue
            if rule.code is not None and (codes is None or rule.code not in codes):
                continue
            if rule.text is not None and rule.text not in (text or ""):
                continue
        return rule.verdict
    return "final"


# The one statement of which answers are temporary in general (docs/bulk-data.md "Download" and
# "Kick-off": 408, 429, 5xx and network errors; docs/medplum.md "Quotas and 429"). A part of the spec
# that needs another rule uses its own table of RetryRules (BULK_RULES, STATUS_POLL_RULES).
TEMPORARY_RULES: tuple[RetryRule, ...] = (RetryRule(TEMPORARY_STATUS, "retry"),)
RETRYABLE_STATUS = frozenset().union(
    *(r.statuses for r in TEMPORARY_RULES if r.code is None and not r.not_fhir and r.verdict == "retry")
)
# One entry of a Medplum batch-response (docs/medplum.md "Batch Bundles"; the outer answer is 200
# whatever its entries say). Temporary as above, plus: 409, a serialization conflict between
# concurrent Bundles (docs/medplum.md "Measured on a real server"); 0, an entry the response lacks;
# a 400 "did not match resolved ID" (docs/medplum.md, recorded case 16: another writer created the
# identity first, so re-sending updates it). A 429 entry was not run (docs/medplum.md "Quotas and 429").
BATCH_ENTRY_RULES: tuple[RetryRule, ...] = (
    RetryRule(frozenset({0, 409}), "retry"),
    *TEMPORARY_RULES,
    RetryRule(frozenset({400}), "retry", text="did not match resolved ID"),
)


def is_temporary(response: httpx.Response, rules: tuple[RetryRule, ...] = TEMPORARY_RULES) -> bool:
    """Whether an answer is worth a retry within the retry budget: the first matching rule decides."""
    return classify(response, rules) == "retry"
