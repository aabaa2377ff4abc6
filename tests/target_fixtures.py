"""pytest fixtures for the target (Medplum-like) sandbox. Owned by the target sandbox work.

- `target_sandbox` (session): a started in-memory `TargetSandbox` (quota off for its main client,
  `TARGET_CLIENT`/`TARGET_SECRET`) plus a stock-quota client (`QUOTA_CLIENT`, 50,000 points/min).
- `target` (function): the same sandbox, reset (data, faults, counters, quota windows) before each test.
- `target_factory` (function): `target_factory(state_dir, **kwargs)` starts another sandbox (e.g. on a
  state_dir, to stop and restart it on the same state); all are stopped at teardown.
- Helpers: `target_token(sandbox)`, `fhir_client(sandbox)` (an httpx.Client with a bearer token),
  `conditional_put_entry(...)`, `patient(...)`, `batch(...)`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import closed_at_end
from server_fixtures import starts_servers

from pfsync.core.settings import HttpSettings
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, RetryPolicy
from pfsync.sandbox.target.server import TargetSandbox

__all__ = [
    "MRN",
    "QUOTA_CLIENT",
    "QUOTA_SECRET",
    "TARGET_CLIENT",
    "TARGET_SECRET",
    "batch",
    "conditional_put_entry",
    "fhir_client",
    "medplum_client",
    "medplum_of",
    "patient",
    "target",
    "target_factory",
    "target_sandbox",
    "target_token",
]

TARGET_CLIENT = "pfsync-target"
TARGET_SECRET = "target-secret"
QUOTA_CLIENT = "quota-client"
QUOTA_SECRET = "quota-secret"
MRN = "urn:example:mrn"


@pytest.fixture(scope="session")
@starts_servers
def target_sandbox() -> Iterator[TargetSandbox]:
    sandbox = TargetSandbox(client_id=TARGET_CLIENT, client_secret=TARGET_SECRET).start()
    sandbox.add_client(QUOTA_CLIENT, QUOTA_SECRET, quota=50_000, quota_window=60.0)
    yield sandbox
    sandbox.stop()


@pytest.fixture
def target(target_sandbox: TargetSandbox) -> TargetSandbox:
    target_sandbox.reset()
    target_sandbox.set_auth_limit(None)  # tests of the auth rate limit set their own
    target_sandbox.check_references_on_write = False
    target_sandbox.max_json_size = 1_048_576
    return target_sandbox


@pytest.fixture
@starts_servers
def target_factory() -> Iterator[Callable[..., TargetSandbox]]:
    started: list[TargetSandbox] = []

    def make(state_dir: Path | None = None, **kwargs: Any) -> TargetSandbox:
        sandbox = TargetSandbox(state_dir=state_dir, **kwargs).start()
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        if sandbox._server is not None:
            sandbox.stop()


def target_token(sandbox: TargetSandbox, client_id: str = TARGET_CLIENT, secret: str = TARGET_SECRET) -> str:
    r = httpx.post(
        sandbox.base_url + "oauth2/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


def fhir_client(
    sandbox: TargetSandbox, client_id: str = TARGET_CLIENT, secret: str = TARGET_SECRET
) -> httpx.Client:
    token = target_token(sandbox, client_id, secret)
    client = httpx.Client(
        base_url=sandbox.fhir_url,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        timeout=60.0,
    )
    return closed_at_end(client)


def medplum_of(
    client: httpx.Client, *, fhir_url: str | None = None, clock: Clock | None = None, http: HttpSettings | None = None,
    policy: RetryPolicy | None = None, stop: threading.Event | None = None,
) -> MedplumClient:  # fmt: skip
    """A MedplumClient over a test's own httpx.Client (its auth its own; its base URL the FHIR base
    unless `fhir_url`), with the clock, retry policy and stop that MedplumClient.connect gives one
    in production. The httpx client is closed when the test ends."""
    closed_at_end(client)
    policy = policy or RetryPolicy.from_settings(http or HttpSettings())
    return MedplumClient(client, fhir_url=fhir_url, clock=clock, policy=policy, stop=stop)


def medplum_client(
    sandbox: TargetSandbox, client_id: str = TARGET_CLIENT, secret: str = TARGET_SECRET, **kwargs: Any
) -> MedplumClient:
    """`fhir_client` as a MedplumClient (`medplum_of`'s keywords)."""
    return medplum_of(fhir_client(sandbox, client_id, secret), **kwargs)


def patient(value: str, given: str = "Jane", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": value}],
        "name": [{"family": "Doe", "given": [given]}],
        "gender": "female",
        "birthDate": "1980-01-02",
        **extra,
    }


def conditional_put_entry(resource: dict[str, Any], system: str = MRN) -> dict[str, Any]:
    value = resource["identifier"][0]["value"]
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}?identifier={system}|{value}"},
    }


def batch(*entries: dict[str, Any], type_: str = "batch") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": type_, "entry": list(entries)}
