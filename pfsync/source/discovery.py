"""Where a source's token endpoint is: its `.well-known/smart-configuration`, else the
CapabilityStatement's oauth-uris extension, else the `source.token_url` override (docs/bulk-data.md
"Auth"), with what the smart-configuration advertises (capabilities, auth methods, signing algs) and
the resource types a CapabilityStatement lists.

May import: pfsync.core, pfsync.net.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from pfsync.core.errors import ConfigError, HTTPError
from pfsync.net.http import Clock, RetryPolicy, SystemClock, request_with_retry
from pfsync.net.tokens import (
    NO_AUTH,
)

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


@dataclass(frozen=True)
class Discovery:
    """Where the token endpoint came from, and what the server's smart-configuration advertises."""

    token_endpoint: str
    found_in: Literal["setting", "smart-configuration", "metadata"]
    capabilities: frozenset[str] = frozenset()
    auth_methods: tuple[str, ...] = ()
    signing_algs: tuple[str, ...] = ()
    smart_configuration: bool = False


def get_json(client: httpx.Client, url: str, accept: str, policy: RetryPolicy, clock: Clock) -> Any:
    """The JSON body of a 200 answer to an unauthenticated GET (retried); None for any other answer."""
    response = request_with_retry(
        lambda: client.get(url, headers={"Accept": accept}, auth=NO_AUTH),
        method="GET",
        url=url,
        policy=policy,
        clock=clock,
    )
    if response.status_code != 200:
        return None
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _token_from_capability(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    for rest in doc.get("rest") or []:
        for ext in ((rest or {}).get("security") or {}).get("extension") or []:
            if isinstance(ext, dict) and ext.get("url") == OAUTH_URIS:
                for sub in ext.get("extension") or []:
                    if isinstance(sub, dict) and sub.get("url") == "token" and sub.get("valueUri"):
                        return str(sub["valueUri"])
    return None


def capability_resource_types(doc: Any) -> frozenset[str]:
    """rest[].resource[].type of a CapabilityStatement."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement":
        return frozenset()
    return frozenset(
        str(r["type"])
        for rest in doc.get("rest") or []
        if isinstance(rest, dict)
        for r in rest.get("resource") or []
        if isinstance(r, dict) and isinstance(r.get("type"), str)
    )


def discover(
    client: httpx.Client,
    base_url: str,
    *,
    token_url: str | None = None,
    policy: RetryPolicy | None = None,
    clock: Clock | None = None,
) -> Discovery:
    """Find the token endpoint (docs/bulk-data.md "Auth": smart-configuration, then metadata, override wins)."""
    policy = policy or RetryPolicy()
    clock = clock or SystemClock()
    base = base_url.rstrip("/")
    try:
        smart = get_json(client, f"{base}/.well-known/smart-configuration", "application/json", policy, clock)
    except HTTPError:
        if token_url is None:
            raise
        smart = None  # with an override, the smart-configuration only tunes the scope syntax
    except httpx.HTTPError:  # redirect loops, undecodable bodies: no smart-configuration
        smart = None
    smart = smart if isinstance(smart, dict) else {}
    caps = frozenset(str(c) for c in smart.get("capabilities") or [] if isinstance(c, str))
    extras: dict[str, Any] = {
        "capabilities": caps,
        "auth_methods": tuple(str(m) for m in smart.get("token_endpoint_auth_methods_supported") or []),
        "signing_algs": tuple(
            str(a) for a in smart.get("token_endpoint_auth_signing_alg_values_supported") or []
        ),
        "smart_configuration": bool(smart),
    }
    if token_url:
        return Discovery(token_url, "setting", **extras)
    if isinstance(smart.get("token_endpoint"), str) and smart["token_endpoint"]:
        return Discovery(smart["token_endpoint"], "smart-configuration", **extras)
    endpoint = _token_from_capability(
        get_json(client, f"{base}/metadata", "application/fhir+json", policy, clock)
    )
    if endpoint:
        return Discovery(endpoint, "metadata", **extras)
    raise ConfigError(
        f"no token endpoint found for {base}: neither .well-known/smart-configuration nor the "
        "CapabilityStatement (metadata) names one",
        setting="source.token_url",
        hint="check the FHIR base URL (PF_FHIR_BASE_URL), or set PFSYNC_TOKEN_URL to the token endpoint",
    )
