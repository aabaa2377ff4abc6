"""The HTTP layer, one import point: one client factory, one retry path, and error text from
OperationOutcomes. The names live in modules by job, re-exported here for callers:
pfsync.net.client (make_client, RequestGuard), pfsync.net.retry (RetryPolicy, Retrier,
request_with_retry), pfsync.net.classify (the RetryRule tables, decide), pfsync.net.waits (Clock,
Retry-After, wait), pfsync.net.responses (server_text, outcome_text, json_object, next_link) and
pfsync.net.decode (iter_decoded).

Library classes take an `httpx.Client` (the network is injected); only `make_client`
builds a real one, and every client it builds applies RequestGuard on every hop: the URL rules
of pfsync.core.netpolicy, no redirect for a request carrying a body or credentials, attachments
pinned to their origin; proxy and CAs from pfsync's settings, not the environment. Sleeping and
the clock are injected too (`Clock`), so retry tests run instantly.

Retries follow docs/bulk-data.md / cumulus-fhir-support and are decided in one place, `Retrier`
(used by `request_with_retry`, pfsync.medplum.client and the download resume loop): network
errors and the answers a classifier table names (`decide`; TEMPORARY_RULES: 408, 429, 5xx; the
Bulk Data and batch-entry tables beside it) are temporary; the wait is Retry-After in both forms
(seconds and HTTP-date) or Medplum's msBeforeNext or spent RateLimit window, capped, else
backoff; waits end on SIGTERM. What a server sends reaches a message only through `server_text`
(redacted, capped, no control characters), URLs through `shown_url` (no query). Answers that
must be JSON objects go through `json_object`, Bundle paging through `next_link`, streamed
bodies through `iter_decoded` (bounded inflation).
"""

from __future__ import annotations

from pfsync.net.classify import (
    BATCH_ENTRY_RULES,
    BULK_RULES,
    DOWNLOAD_RULES,
    KICKOFF_RULES,
    RETRYABLE_STATUS,
    STATUS_POLL_RULES,
    TEMPORARY_RULES,
    RetryRule,
    Verdict,
    classify,
    decide,
    is_temporary,
    outcome_codes,
)
from pfsync.net.client import (
    MAX_REDIRECTS,
    PIN_ORIGIN,
    STREAMED,
    USER_AGENT,
    RequestGuard,
    make_client,
    protocol_error,
)
from pfsync.net.decode import (
    ACCEPT_ENCODING,
    DECODE_CHUNK,
    iter_decoded,
)
from pfsync.net.responses import (
    SERVER_TEXT_MAX,
    http_error,
    json_object,
    next_link,
    outcome_from_json,
    outcome_text,
    raise_for_status,
    server_text,
)
from pfsync.net.retry import (
    Retrier,
    RetryPolicy,
    request_with_retry,
)
from pfsync.net.waits import (
    RUN_STOP,
    Clock,
    SystemClock,
    hinted_wait,
    parse_retry_after,
    ratelimit_reset,
    wait,
    wait_from_outcome,
)

__all__ = [
    "ACCEPT_ENCODING",
    "BATCH_ENTRY_RULES",
    "BULK_RULES",
    "DECODE_CHUNK",
    "DOWNLOAD_RULES",
    "KICKOFF_RULES",
    "MAX_REDIRECTS",
    "PIN_ORIGIN",
    "RETRYABLE_STATUS",
    "RUN_STOP",
    "SERVER_TEXT_MAX",
    "STATUS_POLL_RULES",
    "STREAMED",
    "TEMPORARY_RULES",
    "USER_AGENT",
    "Clock",
    "RequestGuard",
    "Retrier",
    "RetryPolicy",
    "RetryRule",
    "SystemClock",
    "Verdict",
    "classify",
    "decide",
    "hinted_wait",
    "http_error",
    "is_temporary",
    "iter_decoded",
    "json_object",
    "make_client",
    "next_link",
    "outcome_codes",
    "outcome_from_json",
    "outcome_text",
    "parse_retry_after",
    "protocol_error",
    "raise_for_status",
    "ratelimit_reset",
    "request_with_retry",
    "server_text",
    "wait",
    "wait_from_outcome",
]
