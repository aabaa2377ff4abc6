"""What a server answered, read safely: its text fit for a message (`server_text`: redacted, capped,
no control characters), an OperationOutcome's or OAuth error's text, an error answer as HTTPError,
a body that must be a JSON object, and a Bundle's `next` link kept on its server.

May import: pfsync.core.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from pfsync.core.errors import HTTPError, ProtocolError
from pfsync.core.netpolicy import origin, shown_url
from pfsync.core.redact import redact

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SERVER_TEXT_MAX = 500


def server_text(text: str) -> str:
    """Text a server sent, made fit for a message: secrets masked, control characters (terminal
    escapes) dropped, at most SERVER_TEXT_MAX characters."""
    text = _CONTROL.sub("", text).strip()
    if len(text) > SERVER_TEXT_MAX:
        text = text[:SERVER_TEXT_MAX] + "..."
    return redact(text)


def outcome_text(response: httpx.Response) -> str | None:
    """The human text of an OperationOutcome body (details.text, diagnostics), or of an OAuth error."""
    try:
        content = response.content
    except httpx.HTTPError:  # unreadable or undecodable body: nothing to show
        return None
    try:
        body = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        text = content[:2000].decode("utf-8", "replace").strip()
        return server_text(text) if text else None
    return outcome_from_json(body)


def outcome_from_json(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    if body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = (issue.get("details") or {}).get("text") or issue.get("diagnostics") or issue.get("code")
            if text:
                parts.append(str(text))
        return server_text("; ".join(parts)) if parts else None
    if "error" in body:  # OAuth2 error response (RFC 6749 5.2)
        desc = body.get("error_description")
        return server_text(f"{body['error']}: {desc}" if desc else str(body["error"]))
    return None


def http_error(response: httpx.Response, what: str) -> HTTPError:
    """An HTTPError for an error response, carrying its OperationOutcome text (redacted URL)."""
    text = outcome_text(response)
    req = response.request
    return HTTPError(
        f"{what}: {req.method} {shown_url(str(req.url))} answered {response.status_code}"
        + (f": {text}" if text else ""),
        method=req.method,
        url=str(req.url),
        status=response.status_code,
        outcome=text,
    )


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Turn an error response into an HTTPError carrying the OperationOutcome text."""
    if not response.is_success:
        raise http_error(response, what)


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The body of a 2xx answer that must be a JSON object (a Bundle, a resource, a manifest);
    ProtocolError (exit 5) naming `what` and the URL (without its query) when it is not."""
    try:
        body = orjson.loads(response.content)
    except (orjson.JSONDecodeError, httpx.HTTPError):
        body = None
    if not isinstance(body, dict):
        kind = "a JSON " + type(body).__name__.replace("list", "array") if body is not None else "not JSON"
        raise ProtocolError(f"{what}: {response.request.method} {shown_url(str(response.request.url))} answered "
                            f"{response.status_code} with a body that is {kind}, not a JSON object")  # fmt: skip
    return body


def next_link(bundle: dict[str, Any], current: str, what: str, *, rebase_on: str | None = None) -> str | None:
    """The one reading of a Bundle's `next` link, resolved against `current`. A server may page,
    not send pfsync (and what it reads next, taken as data) elsewhere: the link must stay on the
    origin of `current`, or, with `rebase_on` (a FHIR base URL), is moved onto it when it names
    the same FHIR path under another base (Medplum writes links with its configured public base,
    which may differ from the URL pfsync reaches it by); anything else is ProtocolError."""
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            url = str(httpx.URL(current).join(link["url"]))
            if rebase_on is not None and not url.startswith(rebase_on):
                marker = urlsplit(rebase_on).path
                parts = urlsplit(url)
                tail = parts.path + ("?" + parts.query if parts.query else "")
                at = tail.find(marker)
                if at >= 0:
                    url = rebase_on + tail[at + len(marker) :]
            home = rebase_on if rebase_on is not None else current
            if origin(url) != origin(home):
                raise ProtocolError(f"{what}: the next page {shown_url(url)} refused: it is not on {origin(home)}",
                                    hint="a server's paging link may not send pfsync to another origin")  # fmt: skip
            return url
    return None
