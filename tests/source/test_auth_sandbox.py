"""Integration: the full token cycle over real HTTP against the source and target sandboxes.

The source sandbox verifies every assertion with the public JWKS that `generate_key_pair` (what
`pfsync auth keygen` writes) produced, exactly as Practice Fusion does with the registered JWKS URL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import pytest
from conftest import closed_at_end
from target_fixtures import TARGET_CLIENT, TARGET_SECRET

from pfsync.core.errors import AuthError
from pfsync.core.redact import Secret
from pfsync.core.settings import HttpSettings, MedplumSettings, SourceSettings
from pfsync.medplum.auth import MedplumAuthenticator, OriginBasicAuth, medplum_auth
from pfsync.net.tokens import BearerAuth
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox
from pfsync.source.auth import SourceAuthenticator, source_auth
from pfsync.source.keys import KeyPair, generate_key_pair

pytestmark = pytest.mark.integration

APP = "pfsync-keygen-app"
HTTP = HttpSettings(retries=3, retry_max_wait=2.0)
KICKOFF = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


@dataclass
class OffsetClock:
    """Real time plus an offset we control; sleeping only advances the offset (no real waits)."""

    offset: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture(scope="module")
def es_pair() -> KeyPair:
    return generate_key_pair("ES384")


@pytest.fixture(scope="module")
def rs_pair() -> KeyPair:
    return generate_key_pair("RS384")


def _source(sandbox: SourceSandbox, pair: KeyPair, **extra: object) -> SourceSettings:
    values: dict[str, object] = {"name": "practice-a", "base_url": sandbox.base_url(), "client_id": APP,
                                 "private_key": Secret(pair.private_pem), "key_id": pair.kid,
                                 "resource_types": ("Patient", "Observation", "Condition")}  # fmt: skip
    values.update(extra)
    return SourceSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_sandbox_keygen_jwks_token_and_kickoff(source: SourceSandbox, es_pair: KeyPair, rs_pair: KeyPair,
                                               alg: str) -> None:  # fmt: skip
    pair = es_pair if alg == "ES384" else rs_pair
    source.register_client(APP, jwks=pair.jwks)
    client = closed_at_end(httpx.Client())
    authn, bearer = source_auth(_source(source, pair), client, http=HTTP, clock=OffsetClock())
    client.auth = bearer
    response = client.get(
        source.base_url() + "/Patient/$export", params={"_type": "Patient"}, headers=KICKOFF
    )
    assert response.status_code == 202
    assert client.delete(response.headers["Content-Location"]).status_code == 202
    assert authn.scope_version == "v2"
    assert authn.granted_types(["Patient", "Observation", "Condition"]) == (
        ["Patient", "Observation", "Condition"],
        [],
    )
    assert source.stats.count("token") == 1


def test_sandbox_token_renewed_before_expiry(source: SourceSandbox, es_pair: KeyPair) -> None:
    source.register_client(APP, jwks=es_pair.jwks)
    source.configure(token_lifetime=30)
    clock = OffsetClock()
    authn = SourceAuthenticator(
        _source(source, es_pair), closed_at_end(httpx.Client()), http=HTTP, clock=clock
    )
    first = authn.token()
    assert authn.token() == first  # cached
    clock.offset = 25  # 5 s left of 30: inside the renewal margin
    second = authn.token()
    assert second != first
    assert source.stats.count("token") == 2  # the second assertion (exp still <= 300 s ahead) was accepted
    for token in (first, second):
        r = httpx.get(
            source.base_url() + "/Patient",
            params={"_count": "1"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200


def test_sandbox_mid_run_401_renews_once_and_retries(source: SourceSandbox, es_pair: KeyPair) -> None:
    source.register_client(APP, jwks=es_pair.jwks)
    client = closed_at_end(httpx.Client())
    _, bearer = source_auth(_source(source, es_pair), client, http=HTTP, clock=OffsetClock())
    client.auth = bearer
    source.faults.revoke_tokens_after_kickoff()
    kick = client.get(source.base_url() + "/Patient/$export", params={"_type": "Patient"}, headers=KICKOFF)
    assert kick.status_code == 202
    status_url = kick.headers["Content-Location"]
    manifest = None
    for _ in range(400):  # the token died after the kick-off: the first poll meets a 401
        poll = client.get(status_url)
        assert poll.status_code in (200, 202), poll.text
        if poll.status_code == 200:
            manifest = poll.json()
            break
        time.sleep(0.01)
    assert manifest is not None
    assert source.stats.count("token") == 2
    (refused,) = source.stats.requests("unauthorized")  # the sandbox files 401s under their own kind
    assert refused.url == status_url and refused.status == 401
    # A streamed download after another revocation: the 401 is consumed, the retry streams the file.
    source.revoke_tokens()
    url = manifest["output"][0]["url"]
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines and all('"resourceType"' in line for line in lines)
    assert source.stats.count("token") == 3 and source.stats.count("unauthorized") == 2
    assert client.delete(status_url).status_code == 202


def test_sandbox_token_never_sent_to_foreign_storage(source: SourceSandbox, es_pair: KeyPair) -> None:
    source.register_client(APP, jwks=es_pair.jwks)
    client = closed_at_end(httpx.Client())
    _, bearer = source_auth(_source(source, es_pair), client, http=HTTP, clock=OffsetClock())
    client.auth = bearer
    client.get(source.foreign_url + "/storage/x/Patient/1")
    client.get(source.base_url() + "/Patient", params={"_count": "1"})
    assert not source.stats.authorization_sent(source.foreign_url)
    assert source.stats.authorization_sent(source.base_url())


def test_sandbox_client_secret_basic(source: SourceSandbox) -> None:
    settings = SourceSettings(name="basic", base_url=source.base_url(), client_id="pfsync-sandbox",
                              client_secret=Secret("sandbox-secret"), resource_types=("Patient",))  # fmt: skip
    authn = SourceAuthenticator(settings, closed_at_end(httpx.Client()), http=HTTP, clock=OffsetClock())
    assert authn.token()
    assert authn.method == "client_secret_basic" and authn.granted_types(["Patient"]) == (["Patient"], [])


def test_sandbox_token_429_is_retried(source: SourceSandbox, es_pair: KeyPair) -> None:
    source.register_client(APP, jwks=es_pair.jwks)
    source.faults.rate_limit("token", times=2, retry_after=3)
    clock = OffsetClock()
    assert SourceAuthenticator(
        _source(source, es_pair), closed_at_end(httpx.Client()), http=HTTP, clock=clock
    ).token()
    assert clock.sleeps == [2.0, 2.0]  # Retry-After 3 clamped to retry_max_wait; fresh jti each time
    assert [s.status for s in source.stats.requests("token")] == [429, 429, 200]


@pytest.mark.parametrize(
    ("case", "hint_word"),
    [("wrong_kid", "kid"), ("other_key", "does not match"), ("unknown_client", "client id"), ("clock_ahead", "clock skew"),
     ("no_scope", "practice admin")],
)  # fmt: skip
def test_sandbox_token_refusals_have_hints(source: SourceSandbox, es_pair: KeyPair,
                                           case: str, hint_word: str) -> None:  # fmt: skip
    clock = OffsetClock()
    settings = _source(source, es_pair)
    if case == "wrong_kid":
        source.register_client(APP, jwks=es_pair.jwks)
        settings = _source(source, es_pair, key_id="not-the-registered-kid")
    elif case == "other_key":  # the kid is registered, but we sign with another private key
        source.register_client(APP, jwks=es_pair.jwks)
        # (another ES384 key: an RS384 assertion against an EC JWK makes the sandbox answer 500)
        settings = _source(source, generate_key_pair("ES384"), key_id=es_pair.kid)
    elif case == "unknown_client":
        pass
    elif case == "clock_ahead":
        source.register_client(APP, jwks=es_pair.jwks)
        clock.offset = 600
    else:
        source.register_client(APP, jwks=es_pair.jwks, allowed_scopes=["system/Encounter.read"])
        settings = _source(source, es_pair, resource_types=("Patient",))
    with pytest.raises(AuthError) as info:
        SourceAuthenticator(settings, closed_at_end(httpx.Client()), http=HTTP, clock=clock).token()
    assert hint_word in (info.value.hint or ""), (info.value.message, info.value.hint)
    assert source.stats.count("token") == 1  # refusals are not retried


def test_sandbox_partial_scopes_are_named(source: SourceSandbox, es_pair: KeyPair) -> None:
    source.register_client(APP, jwks=es_pair.jwks, allowed_scopes=["system/Patient.read"])
    authn = SourceAuthenticator(
        _source(source, es_pair, scope_version="v1"), closed_at_end(httpx.Client()), http=HTTP
    )
    authn.token()
    assert authn.granted_types(["Patient", "Observation", "Condition"]) == (
        ["Patient"],
        ["Observation", "Condition"],
    )


def test_sandbox_two_practices_each_with_their_own_audience_and_token(es_pair: KeyPair) -> None:
    practices = ["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"]
    with SourceSandbox(practices=practices, client_id=APP, client_secret=None, jwks=es_pair.jwks) as sandbox:
        client = closed_at_end(httpx.Client())
        auths = []
        for practice in practices:
            settings = _source(sandbox, es_pair, name=practice[:4], base_url=sandbox.base_url(practice))
            authn, bearer = source_auth(settings, client, http=HTTP, clock=OffsetClock())
            auths.append(authn)
            r = client.get(sandbox.base_url(practice) + "/Patient", params={"_count": "1"}, auth=bearer)
            assert r.status_code == 200
        assert [a.token_endpoint for a in auths] == [sandbox.token_url(p) for p in practices]
        assert auths[0].token() != auths[1].token()
        # A token of one practice is refused by the other (tokens are per practice audience).
        cross = client.get(sandbox.base_url(practices[1]) + "/Patient",
                           headers={"Authorization": f"Bearer {auths[0].token()}"})  # fmt: skip
        assert cross.status_code == 401


# ---- Medplum (target sandbox) ----------------------------------------------------------------


def _medplum(target: TargetSandbox, **extra: object) -> MedplumSettings:
    values: dict[str, object] = {"base_url": target.base_url, "client_id": TARGET_CLIENT,
                                 "client_secret": Secret(TARGET_SECRET)}  # fmt: skip
    values.update(extra)
    return MedplumSettings(**values)  # type: ignore[arg-type]


def test_target_one_token_for_many_calls_and_one_renewal_after_401(target: TargetSandbox) -> None:
    client = closed_at_end(httpx.Client())
    client.auth = medplum_auth(_medplum(target), client, http=HTTP)
    for _ in range(40):
        assert client.get(target.fhir_url + "Patient", params={"_count": "1"}).status_code == 200
    assert target.stats.token_requests == 1
    target.faults.expire_tokens()
    for _ in range(10):
        assert client.get(target.fhir_url + "Patient", params={"_count": "1"}).status_code == 200
    assert target.stats.token_requests == 2


def test_target_basic_mode_never_asks_for_a_token(target: TargetSandbox) -> None:
    client = closed_at_end(httpx.Client())
    auth = medplum_auth(_medplum(target, auth="basic"), client)
    assert isinstance(auth, OriginBasicAuth)
    client.auth = auth
    for _ in range(5):
        assert client.get(target.fhir_url + "Patient", params={"_count": "1"}).status_code == 200
    assert target.stats.token_requests == 0


@pytest.mark.parametrize(("overrides", "hint"), [({"client_secret": Secret("wrong-secret")}, "MEDPLUM_CLIENT_SECRET"),
                                                 ({"client_id": "nobody"}, "MEDPLUM_CLIENT_ID")])  # fmt: skip
def test_target_token_refusal(target: TargetSandbox, overrides: dict[str, object], hint: str) -> None:
    with pytest.raises(AuthError) as info:
        MedplumAuthenticator(_medplum(target, **overrides), closed_at_end(httpx.Client()), http=HTTP).token()
    assert hint in (info.value.hint or "")
    assert target.stats.token_requests == 1


def test_target_bearer_is_a_bearer_auth(target: TargetSandbox) -> None:
    assert isinstance(medplum_auth(_medplum(target), closed_at_end(httpx.Client())), BearerAuth)
