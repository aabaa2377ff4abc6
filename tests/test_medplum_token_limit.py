"""One Medplum token per process, and a token-endpoint 429 waited out (issue 15 criterion 5, issue 19
criterion 4), against the target sandbox enforcing Medplum's auth rate limit (medplum.md "Quotas
and 429": 160 token requests a minute per client address, shared by every process behind it)."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from sync_helpers import run, summary, sync_env

from pfsync.sandbox.source import SourceSandbox
from pfsync.sandbox.target import TargetSandbox

pytestmark = pytest.mark.integration

SOURCES = 6


def _token_request(target: TargetSandbox) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "client_id": "pfsync-target",
        "client_secret": "target-secret",
    }
    return httpx.post(target.base_url + "oauth2/token", data=form)


def test_sandbox_target_enforces_the_auth_rate_limit(target: TargetSandbox) -> None:
    target.set_auth_limit(3, seconds=60.0)
    answers = [_token_request(target) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[3].json()["issue"][0]["code"] == "throttled"
    assert answers[3].headers["RateLimit"].startswith('"requests";r=0;t=')
    target.reset()  # a new window (the limit stays)
    assert _token_request(target).status_code == 200


def test_sync_of_many_sources_shares_one_medplum_token_and_waits_out_a_429(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path
) -> None:
    config = tmp_path / "pfsync.toml"
    config.write_text("".join(
        f'[[sources]]\nname = "practice-{i}"\nbase_url = "{source.base_url()}"\nclient_id = "pfsync-sandbox"\n'
        f'client_secret = "sandbox-secret"\n'
        'identifier_system = "https://practicefusion.com/fhir/{source}/{type_lower}-id"\n'
        for i in range(SOURCES)
    ))  # fmt: skip
    # A small window, already spent by "other processes behind the same address".
    target.set_auth_limit(2, seconds=2.0)
    while _token_request(target).status_code != 429:
        pass
    before = target.stats.token_requests
    env = sync_env(
        source, target, tmp_path / "state", PF_RESOURCE_TYPES="Patient", PFSYNC_PARALLEL_SOURCES="3"
    )
    for key in ("PF_FHIR_BASE_URL", "PF_CLIENT_ID", "PF_CLIENT_SECRET", "PFSYNC_SOURCE_NAME"):
        env.pop(key)
    code, out, err = run(env, "--config", str(config), "sync", timeout=120)
    assert code == 0, err[-3000:]
    assert [s["exitCode"] for s in summary(out)["sources"]] == [0] * SOURCES
    for i in range(SOURCES):
        state = orjson.loads((tmp_path / "state" / f"practice-{i}" / "checkpoint.json").read_bytes())
        assert state["transactionTime"], f"practice-{i} did not land"
    # One token for the whole process: the refused request (429) and the one after the wait.
    assert target.stats.token_requests - before <= 2, target.stats.token_requests - before
